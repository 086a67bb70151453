"""Packuments and version documents as the npm clients read them.

Two sources feed the same shapes: local packages (core's `Package`, see `local.py`) and upstream
documents (see `upstream.py`). Either way every `dist.tarball` is rewritten to point at this hub,
so clients never talk to an upstream directly. Responses are pre-serialized once per
(registry, package, revision, variant) and kept in a small per-process LRU (`RenderedCache`),
with a strong ETag; whoever uses the cache must first check the shared revision.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from batlehub.api import (
    DocumentSummary,
    Package,
    PackageRows,
    accepts,
    content_etag,
    epoch_of,
    gzipped,
    json_may_need_repair,
    package_of,
    repair_json,
)
from batlehub_npm.names import PackageName, latest_version, version_sort_key

ABBREVIATED_TYPE = "application/vnd.npm.install-v1+json"
FULL_TYPE = "application/json"

# What installing needs from each version (the abbreviated "corgi" form).
ABBREVIATED_VERSION_FIELDS = (
    "name",
    "version",
    "dependencies",
    "optionalDependencies",
    "devDependencies",
    "peerDependencies",
    "peerDependenciesMeta",
    "bundleDependencies",
    "bundledDependencies",
    "acceptDependencies",
    "bin",
    "directories",
    "engines",
    "os",
    "cpu",
    "libc",
    "dist",
    "deprecated",
    "funding",
    "license",
    "hasInstallScript",
    "_hasShrinkwrap",
)


def make_rev(name: str, created: float, revision: int) -> str:
    """CouchDB-style `_rev`: the revision number plus a short hash that also changes when a
    package is deleted and published again (its revision starts over, its creation time does not)."""
    digest = hashlib.sha1(f"{name}\0{created!r}\0{revision}".encode()).hexdigest()[:16]
    return f"{revision}-{digest}"


def iso_time(ts: float) -> str:
    """npm's timestamp format: ISO 8601, UTC, milliseconds."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


def tarball_url(registry_url: str, package: PackageName, version: str) -> str:
    """Where clients download a tarball from: always this hub (`registry_url`: the registry's
    absolute URL, `batlehub.api.registry_url`)."""
    return f"{registry_url}/{package.name}/-/{package.tarball_filename(version)}"


def with_tarball(manifest: Mapping[str, Any], url: str) -> dict[str, Any]:
    """A shallow copy of `manifest` whose `dist.tarball` is `url` (the input is not changed)."""
    out = dict(manifest)
    dist = out.get("dist")
    out["dist"] = {**(dist if isinstance(dist, Mapping) else {}), "tarball": url}
    return out


def abbreviate_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: manifest[k] for k in ABBREVIATED_VERSION_FIELDS if k in manifest}
    scripts = manifest.get("scripts")
    if "hasInstallScript" not in out and isinstance(scripts, Mapping):
        if any(k in scripts for k in ("preinstall", "install", "postinstall")):
            out["hasInstallScript"] = True
    return out


def abbreviate(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The abbreviated packument of a full one (tarball URLs as they are in `doc`)."""
    raw_versions = doc.get("versions")
    versions: Mapping[str, Any] = raw_versions if isinstance(raw_versions, Mapping) else {}
    raw_time = doc.get("time")
    time: Mapping[str, Any] = raw_time if isinstance(raw_time, Mapping) else {}
    out: dict[str, Any] = {
        "name": doc.get("name"),
        "modified": doc.get("modified") or time.get("modified") or iso_time(0),
        "dist-tags": doc.get("dist-tags") or {},
        "versions": {v: abbreviate_manifest(m) for v, m in versions.items() if isinstance(m, Mapping)},
    }
    if time:
        out["time"] = time  # pnpm's time-based resolution reads it when present
    return out


def local_packument(package: Package, registry_url: str, *, abbreviated: bool) -> dict[str, Any]:
    """The packument of a local package (full, or abbreviated)."""
    name = PackageName(package.name)
    versions: dict[str, Any] = {}
    time: dict[str, str] = {"created": iso_time(package.created), "modified": iso_time(package.modified)}
    for item in package.versions:
        versions[item.version] = with_tarball(item.manifest, tarball_url(registry_url, name, item.version))
        time[item.version] = iso_time(item.created)
    dist_tags = dict(package.tags)
    if "latest" not in dist_tags and versions:
        dist_tags["latest"] = latest_version(list(versions)) or next(iter(versions))
    if abbreviated:
        return abbreviate({"name": package.name, "dist-tags": dist_tags, "versions": versions, "time": time})
    extra = package.extra
    doc: dict[str, Any] = {
        "_id": package.name,
        "_rev": make_rev(package.name, package.created, package.revision),
        "name": package.name,
        "description": extra.get("description", ""),
        "dist-tags": dist_tags,
        "versions": versions,
        "time": time,
        "maintainers": [{"name": owner, "email": ""} for owner in package.owners],
        "readme": extra.get("readme", ""),
        "readmeFilename": extra.get("readmeFilename", ""),
        "users": extra.get("users", {}),
    }
    for key in ("keywords", "license", "homepage", "repository", "bugs", "author"):
        if key in extra:
            doc[key] = extra[key]
    return doc


def proxied_packument(
    data: Mapping[str, Any], package: PackageName, registry_url: str, *, abbreviated: bool
) -> dict[str, Any]:
    """An upstream packument with every tarball URL pointing at this hub (upstream URLs stay
    known to the proxy only). `data` is not changed."""
    doc = {k: v for k, v in data.items() if k not in ("_attachments", "_revisions")}
    versions = data.get("versions")
    if isinstance(versions, Mapping):
        doc["versions"] = {
            v: with_tarball(m, tarball_url(registry_url, package, v))
            for v, m in versions.items()
            if isinstance(m, Mapping)
        }
    if abbreviated:
        return abbreviate(doc)
    return doc


def version_document(doc: Mapping[str, Any], version_or_tag: str) -> dict[str, Any] | None:
    """The manifest of one version from a (full) packument; a tag name is resolved first."""
    versions = doc.get("versions") or {}
    tags = doc.get("dist-tags") or {}
    version = version_or_tag if version_or_tag in versions else tags.get(version_or_tag)
    manifest = versions.get(version) if isinstance(version, str) else None
    # Shallow: the caller only serializes it (a deep copy would recurse as deep as the manifest).
    return dict(manifest) if isinstance(manifest, Mapping) else None


def serialize(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=serialize(data), content_type="application/json", headers=headers)


def wants_abbreviated(accept: str | None) -> bool:
    """True when the client prefers the install-only form (npm, pnpm and yarn all ask so)."""
    return accepts(accept, ABBREVIATED_TYPE)


# --- upstream packuments as bytes ---------------------------------------------------------------
# Pure functions of an upstream's packument bytes: core runs them in a worker process for big
# documents (`UpstreamDocuments.extract`, `RegistryServices.offload`), so the event loop never
# decodes a 20 MB packument.


def check_packument(body: bytes) -> bytes:
    """The bytes to keep of an upstream's packument, checked to be one; lone surrogates (which
    no JSON encoder writes back out) become U+FFFD rather than failing every request for it."""
    try:
        data = json.loads(body)
        if not json_may_need_repair(body):
            _check_shape(data)
            return body
        data = repair_json(data)
    except RecursionError:
        raise ValueError("the answer is nested too deeply") from None
    _check_shape(data)
    return serialize(data)


def summarize_packument(body: bytes) -> DocumentSummary:
    """What the web UI's package list shows of a checked upstream packument (the abbreviated form
    has no description; the full one does)."""
    data = json.loads(body)
    tags = data.get("dist-tags")
    latest = tags.get("latest") if isinstance(tags, dict) else None
    # Some registries (Verdaccio) say these only in the versions' manifests: the latest one's then.
    manifest = (data.get("versions") or {}).get(latest) if isinstance(latest, str) else None
    manifest = manifest if isinstance(manifest, dict) else {}
    description = data.get("description") or manifest.get("description")
    time = data.get("time") if isinstance(data.get("time"), dict) else {}
    modified = time.get("modified") or data.get("modified")
    listed = data.get("maintainers") or manifest.get("maintainers") or [manifest.get("_npmUser")]
    people = [str(m["name"]) for m in listed if isinstance(m, dict) and m.get("name")]
    return DocumentSummary(
        description=description if isinstance(description, str) else "",
        latest=latest if isinstance(latest, str) else "",
        modified=modified if isinstance(modified, str) else "",
        maintainers=tuple(people),
    )


def _check_shape(data: Any) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("versions", {}), dict):
        raise ValueError("the answer is not a packument")


def render_local(
    rows: PackageRows, registry_url: str, abbreviated: bool, withheld: tuple[str, ...] = (), view: str = ""
) -> tuple[bytes, bytes | None, str]:
    """A local packument as this hub serves it (without what policies withhold): its bytes, their
    gzip form and the stamp of what they show (pure: a worker process renders a big one)."""
    package = package_of(rows, withheld, view)
    rendered = serialize(local_packument(package, registry_url, abbreviated=abbreviated))
    return rendered, gzipped(rendered), package.stamp


def render_proxied(body: bytes, name: str, registry_url: str, abbreviated: bool) -> tuple[bytes, bytes | None, str]:
    """An upstream packument as this hub serves it: its bytes, their gzip form and their ETag."""
    doc = proxied_packument(json.loads(body), PackageName(name), registry_url, abbreviated=abbreviated)
    rendered = serialize(doc)
    return rendered, gzipped(rendered), content_etag(rendered)


def proxied_version(body: bytes, name: str, registry_url: str, version_or_tag: str) -> dict[str, Any] | None:
    """One version's manifest of an upstream packument (a tag resolved), its tarball at this hub."""
    data = json.loads(body)
    doc = proxied_packument(data, PackageName(name), registry_url, abbreviated=False)
    return version_document(doc, version_or_tag)


def upstream_dist(body: bytes, version: str) -> dict[str, Any] | None:
    """The `dist` of `version` as the upstream announced it (its tarball URL and digests)."""
    manifest = (json.loads(body).get("versions") or {}).get(version)
    dist = manifest.get("dist") if isinstance(manifest, dict) else None
    return dict(dist) if isinstance(dist, dict) else None


def upstream_tags(body: bytes) -> dict[str, str]:
    tags = json.loads(body).get("dist-tags")
    return {k: v for k, v in tags.items() if isinstance(v, str)} if isinstance(tags, dict) else {}


def published_times(body: bytes) -> dict[str, float | None]:
    """Each version of a packument and its publish time at the upstream (`time`), for policies."""
    data = json.loads(body)
    times = data.get("time") if isinstance(data.get("time"), dict) else {}
    out: dict[str, float | None] = {}
    for version in data.get("versions") or {}:
        out[version] = epoch_of(times.get(version))
    return out


def without_versions(body: bytes, withheld: tuple[str, ...]) -> bytes:
    """A packument without `withheld` versions (and their `time`): `latest` moves to the newest
    version left not above it, other tags on a withheld version are dropped."""
    data, gone = json.loads(body), set(withheld)
    versions = {v: m for v, m in (data.get("versions") or {}).items() if v not in gone}
    data["versions"] = versions
    if isinstance(data.get("time"), dict):
        data["time"] = {k: t for k, t in data["time"].items() if k not in gone}
    tags = {t: v for t, v in (data.get("dist-tags") or {}).items() if isinstance(v, str)}
    latest = tags.get("latest")
    data["dist-tags"] = tags = {t: v for t, v in tags.items() if v not in gone}
    if latest in gone:
        below = [v for v in versions if version_sort_key(v) <= version_sort_key(latest)]
        newest = latest_version(below) or latest_version(list(versions))
        tags.update({"latest": newest} if newest else {})
    return serialize(data)
