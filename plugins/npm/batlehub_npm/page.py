"""npm's part of the web UI's package page (the `package_page` hook): a packument, local or
proxied, told in the words core's `PackagePage` shares with every format, plus what an npm user
looks for: dist-tags, deprecations, engines, the commands of npm, pnpm and yarn.

Local packages are read from the package store (sizes and owners are the hub's own); proxied
ones from the cached upstream packument (their README included), never merged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from batlehub.api import (
    Dependency,
    FileInfo,
    NotFound,
    Package,
    PackagePage,
    VersionInfo,
    epoch_of,
)
from batlehub_npm.documents import proxied_packument
from batlehub_npm.names import PackageName, latest_version, version_sort_key

DEPENDENCY_KINDS = (
    ("dependencies", ""),
    ("peerDependencies", "peer"),
    ("optionalDependencies", "optional"),
    ("devDependencies", "dev"),
)
MAX_VERSIONS = 1000
"""Versions a page lists, newest first (a few upstream packages have many thousands)."""
STALE_NOTE = "The upstream registry did not answer: this is the last copy the hub has."


def proxied_page(body: bytes, name: str, registry_url: str, version: str | None) -> PackagePage | None:
    """The page of a proxied package from its upstream packument's bytes, or None when it has no
    such version. Pure (core runs it off the event loop for big packuments, and remembers it)."""
    package = PackageName(name)
    doc = proxied_packument(json.loads(body), package, registry_url, abbreviated=False)
    try:
        return package_page(doc, package, version, local=None)
    except NotFound:
        return None


def package_page(
    doc: Mapping[str, Any], package: PackageName, version: str | None, *, local: Package | None
) -> PackagePage:
    """The page of a full packument (`doc`, its tarball URLs already pointing at this hub)."""
    versions = _mapping(doc.get("versions"))
    tags = {str(t): str(v) for t, v in _mapping(doc.get("dist-tags")).items() if isinstance(v, str)}
    times = _mapping(doc.get("time"))
    if version is not None and version not in versions:
        tagged = tags.get(version)  # `?version=next`
        if tagged is None:
            raise NotFound(f"{package.name} has no version or dist-tag {version!r}")
        version = tagged
    shown = version or tags.get("latest") or latest_version(list(versions))
    manifest = _mapping(versions.get(shown)) if shown else {}
    records = {v.version: v for v in local.versions} if local is not None else {}
    ordered = sorted(versions, key=version_sort_key, reverse=True)[:MAX_VERSIONS]
    infos = tuple(_version(v, _mapping(versions[v]), times.get(v), records.get(v), package) for v in ordered)
    owners = (
        local.owners
        if local is not None
        else tuple(str(m["name"]) for m in doc.get("maintainers") or () if isinstance(m, Mapping) and m.get("name"))
    )
    return PackagePage(
        name=package.name,
        proxied=local is None,
        version=shown,
        description=_text(doc.get("description") or manifest.get("description")),
        readme=_text(doc.get("readme") or manifest.get("readme")),
        readme_markup="markdown",
        versions=infos,
        tags=tags,
        owners=owners,
        dependencies=_dependencies(manifest),
        install=_install(package, shown if shown and shown != tags.get("latest") else None),
        license=_license(manifest.get("license") or doc.get("license")),
        links=_links(manifest or doc),
        facts=_facts(manifest),
    )


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _version(
    version: str, manifest: Mapping[str, Any], published: Any, record: Any, package: PackageName
) -> VersionInfo:
    dist = _mapping(manifest.get("dist"))
    size = None
    if record is not None:
        size = record.size or sum(f.size for f in record.files) or None
    tarball = _text(dist.get("tarball"))
    note = f"sha512 {dist['integrity'][7:23]}…" if _text(dist.get("integrity")).startswith("sha512-") else ""
    deprecated = manifest.get("deprecated")
    return VersionInfo(
        version=version,
        published=epoch_of(published) if record is None else record.created,
        deprecated=deprecated if isinstance(deprecated, str) and deprecated else None,
        size=size,
        files=(FileInfo(package.tarball_filename(version), size, tarball, note=note),),
    )


def _dependencies(manifest: Mapping[str, Any]) -> tuple[Dependency, ...]:
    found = []
    for key, kind in DEPENDENCY_KINDS:
        for name, spec in _mapping(manifest.get(key)).items():
            found.append(Dependency(str(name), spec if isinstance(spec, str) else "", kind))
    return tuple(found)


def _install(package: PackageName, version: str | None) -> tuple[str, ...]:
    spec = f"{package.name}@{version}" if version else package.name
    return (f"npm install {spec}", f"pnpm add {spec}", f"yarn add {spec}")


def _license(value: Any) -> str:
    if isinstance(value, Mapping):  # the old `{"type": "MIT", "url": ...}` form
        value = value.get("type")
    return value if isinstance(value, str) else ""


def _url(value: Any) -> str:
    if isinstance(value, Mapping):
        value = value.get("url")
    if not isinstance(value, str):
        return ""
    url = value.removeprefix("git+")
    if url.startswith("git://"):
        url = "https://" + url[len("git://") :]
    return url.removesuffix(".git") if url.startswith(("https://", "http://")) else ""


def _links(manifest: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    found = [("Homepage", _url(manifest.get("homepage"))), ("Repository", _url(manifest.get("repository")))]
    found.append(("Issues", _url(manifest.get("bugs"))))
    return tuple((label, url) for label, url in found if url)


def _facts(manifest: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    facts = []
    engines = _mapping(manifest.get("engines"))
    if engines:
        facts.append(("Engines", ", ".join(f"{k} {v}" for k, v in engines.items() if isinstance(v, str))))
    unpacked = _mapping(manifest.get("dist")).get("unpackedSize")
    if isinstance(unpacked, int) and not isinstance(unpacked, bool):
        facts.append(("Unpacked size", f"{unpacked / 1000:.1f} kB"))
    bins = manifest.get("bin")
    if isinstance(bins, Mapping) and bins:
        facts.append(("Commands", ", ".join(str(b) for b in bins)))
    if manifest.get("types") or manifest.get("typings"):
        facts.append(("TypeScript", "types included"))
    return tuple(facts)
