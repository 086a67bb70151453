"""PyPI's part of the web UI's package page (the `package_page` hook): a project, local or
proxied, told in the words core's `PackagePage` shares with every format, plus what a Python user
looks for: the summary, the long description as README (Markdown, reStructuredText or plain text,
as its `Description-Content-Type` says), Requires-Python, Requires-Dist grouped by extra, each
file with its size and digests, yanked releases with their reason, and the pip command with the
index URL.

A local project is read from the package store (its release metadata came with the upload). A
proxied one from the upstream index's project page, which lists files only (names, digests,
sizes, upload times, Requires-Python, yanks), completed from the shown release's core metadata
file (PEP 658) when the upstream offers one with a digest: the hub fetches and verifies it as it
does for pip, and reads the summary, README and dependencies in it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from batlehub.api import BadRequest, Dependency, FileInfo, NotFound, Package, PackagePage, VersionInfo, epoch_of
from batlehub_pypi.local import is_metadata_file
from batlehub_pypi.names import latest_release, normalize_version, parse_filename, version_key
from batlehub_pypi.pages import file_url, proxied_page
from batlehub_pypi.simple import parse_project_page

MAX_VERSIONS = 1000
"""Releases a page lists, newest first."""
SHOWN_HASHES = ("sha256", "blake2b_256", "md5")
"""The digests a file row shows, in this order (PyPI's own set); others an upstream names follow."""
PROXIED_NOTE = (
    "No metadata file of this release could be had from the upstream index: its summary, README"
    " and dependencies are inside its files, which pip reads when it installs."
)
STALE_NOTE = "The upstream index did not answer: this is the last copy the hub has."
_EXTRA_MARKER = re.compile(r"""\bextra\s*==\s*["']([^"']+)["']""")
_PLAIN = ("text/plain",)


def readme_of(metadata: Mapping[str, Any]) -> tuple[str, str]:
    """(README, markup) of a release's metadata: Markdown as is (core renders it), reStructuredText
    rendered to HTML (core sanitizes it), plain text as is. Without a content type the long
    description is reStructuredText, as PyPI reads it; one that does not render is shown as text.
    Pure (core may run it off the event loop for a big description)."""
    text = metadata.get("description")
    if not isinstance(text, str) or not text.strip():
        return "", "text"
    content_type = str(metadata.get("description_content_type") or "text/x-rst")
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "text/markdown":
        return text, "markdown"
    if kind in _PLAIN:
        return text, "text"
    from readme_renderer.rst import render  # docutils is slow to import: only when a page needs it

    html = render(text)
    return (html, "html") if html else (text, "text")


def _shown(asked: str | None, versions: Sequence[str], yanked: set[str], project: str) -> str | None:
    if asked is None:
        return latest_release(versions, yanked)
    try:
        wanted = normalize_version(asked)
    except BadRequest:
        raise NotFound(f"{project} has no version {asked!r}") from None
    if wanted in versions:
        return wanted
    equal = [v for v in versions if version_key(v) == version_key(wanted)]  # 1.0 is 1.0.0, as for pip
    if not equal:
        raise NotFound(f"{project} has no version {asked!r}")
    return equal[0]


def dependencies(requires_dist: Any) -> tuple[Dependency, ...]:
    """Requires-Dist as dependencies: those of an extra grouped under `extra <name>`, the marker
    (other than the extra) kept in the requirement."""
    found = []
    for raw in requires_dist or ():
        try:
            req = Requirement(str(raw))
        except InvalidRequirement:
            continue
        marker = str(req.marker) if req.marker else ""
        extra = _EXTRA_MARKER.search(marker)
        kind = f"extra {extra.group(1)}" if extra else ""
        if extra:
            marker = _EXTRA_MARKER.sub("", marker).strip()
            marker = re.sub(r"^(and|or)\s+|\s+(and|or)$", "", marker).strip().strip("()").strip()
        requirement = str(req.specifier)
        if req.extras:
            requirement = "[" + ",".join(sorted(req.extras)) + "]" + requirement
        if req.url:
            requirement += f" @ {req.url}"
        if marker:
            requirement += f"; {marker}"
        found.append(Dependency(req.name, requirement, kind))
    return tuple(found)


def _hashes(values: Mapping[str, Any]) -> dict[str, str]:
    found = {k: str(values[k]) for k in SHOWN_HASHES if isinstance(values.get(k), str) and values[k]}
    found.update({str(k): str(v) for k, v in values.items() if k not in found and k not in SHOWN_HASHES and v})
    return found


def _file_note(filename: str, requires_python: Any) -> str:
    try:
        dist = parse_filename(filename)
    except BadRequest:
        return ""
    kind = "wheel" if dist.packagetype == "bdist_wheel" else "source"
    tag = f" {dist.python_version}" if dist.packagetype == "bdist_wheel" and dist.python_version else ""
    needs = f", Python {requires_python}" if isinstance(requires_python, str) and requires_python else ""
    return f"{kind}{tag}{needs}"


def _install_size(files: Sequence[FileInfo]) -> int | None:
    """The bytes pip downloads for a version: its pure-Python wheel, else the sdist; None when
    that depends on the platform (several wheels) or is not known."""
    wheels = [f for f in files if f.filename.endswith(".whl")]
    pure = [f for f in wheels if f.filename.endswith("-none-any.whl")]
    for candidates in (pure, [] if wheels else list(files)):
        if len(candidates) == 1:
            return candidates[0].size
    return None


def _install(name: str, version: str | None, index_url: str) -> tuple[str, ...]:
    spec = f"{name}=={version}" if version else name
    return (f"pip install {spec}", f"pip install --index-url {index_url} {name}")


def _links(metadata: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    found = []
    home = metadata.get("home_page")
    if isinstance(home, str):
        found.append(("Homepage", home))
    urls = metadata.get("project_urls")
    if isinstance(urls, Mapping):
        found += [(str(label), url) for label, url in urls.items() if isinstance(url, str)]
    unique: dict[str, str] = {}
    for label, url in found:
        unique.setdefault(url, label)
    return tuple((label, url) for url, label in unique.items())


def _license(metadata: Mapping[str, Any]) -> str:
    for key in ("license_expression", "license"):
        value = metadata.get(key)
        if isinstance(value, str) and value.strip():
            line = value.strip().splitlines()[0]
            return line if len(line) <= 80 else line[:79] + "…"
    return ""


def _facts(metadata: Mapping[str, Any], requires_python: str, index_url: str) -> tuple[tuple[str, str], ...]:
    facts = []
    if requires_python:
        facts.append(("Requires-Python", requires_python))
    for label, name_key, email_key in (
        ("Author", "author", "author_email"),
        ("Maintainer", "maintainer", "maintainer_email"),
    ):
        who = metadata.get(name_key) or metadata.get(email_key)
        if isinstance(who, str) and who.strip():
            facts.append((label, who.strip()))
    extras = metadata.get("provides_extra")
    if isinstance(extras, list) and extras:
        facts.append(("Extras", ", ".join(str(e) for e in extras)))
    pythons = [
        c.rsplit("::", 1)[1].strip()
        for c in metadata.get("classifiers") or ()
        if isinstance(c, str) and c.startswith("Programming Language :: Python :: 3")
    ]
    if pythons:
        facts.append(("Python versions", ", ".join(pythons)))
    facts.append(("Index URL", index_url))
    return tuple(facts)


# --- local ----------------------------------------------------------------------------------------


def local_page(package: Package, registry_url: str, version: str | None) -> PackagePage:
    """The page of a project published here (pure: core may run it off the event loop)."""
    name = str(package.extra.get("name") or package.name)
    records = {v.version: v for v in package.versions}
    yanked = {v for v, r in records.items() if r.manifest.get("yanked")}
    shown = _shown(version, list(records), yanked, name)
    infos = []
    for number in sorted(records, key=version_key, reverse=True)[:MAX_VERSIONS]:
        record = records[number]
        reason = str(record.manifest.get("yanked_reason") or "") if number in yanked else None
        files = tuple(
            FileInfo(
                f.filename,
                f.size,
                file_url(registry_url, package.name, f.filename),
                yanked=reason,
                note=_file_note(f.filename, f.meta.get("requires_python")),
                hashes=_hashes({k: f.meta.get(k) for k in SHOWN_HASHES}),
            )
            for f in record.files
            if not is_metadata_file(f.meta)
        )
        infos.append(VersionInfo(number, record.created, yanked=reason, size=_install_size(files), files=files))
    manifest = records[shown].manifest if shown else {}
    metadata = manifest.get("metadata") if isinstance(manifest.get("metadata"), Mapping) else {}
    assert isinstance(metadata, Mapping)
    readme, markup = readme_of(metadata)
    requires_python = metadata.get("requires_python")
    index_url = f"{registry_url}/simple/"
    return PackagePage(
        name=name,
        proxied=False,
        version=shown,
        description=str(metadata.get("summary") or ""),
        readme=readme,
        readme_markup=markup,
        versions=tuple(infos),
        owners=package.owners,
        dependencies=dependencies(metadata.get("requires_dist")),
        install=_install(name, shown, index_url),
        license=_license(metadata),
        links=_links(metadata),
        facts=_facts(metadata, requires_python if isinstance(requires_python, str) else "", index_url),
    )


# --- proxied --------------------------------------------------------------------------------------


def proxied_web_page(body: bytes, project: str, registry_url: str, version: str | None) -> PackagePage | None:
    """The page of a proxied project from its upstream project page's bytes, or None when it has
    no such version. Pure (core runs it off the event loop for big pages, and remembers it)."""
    try:
        return upstream_page(parse_project_page(body), project, registry_url, version)
    except NotFound:
        return None


def upstream_page(data: Mapping[str, Any], project: str, registry_url: str, version: str | None) -> PackagePage:
    """The page of a proxied project from its upstream project page (parsed)."""
    page = proxied_page(data, project, registry_url)
    by_version: dict[str, list[Mapping[str, Any]]] = {str(v): [] for v in page["versions"] if isinstance(v, str)}
    for item in page["files"]:
        try:
            number = parse_filename(item["filename"]).version
        except BadRequest:
            continue
        by_version.setdefault(number, []).append(item)
    yanked = {v for v, files in by_version.items() if files and all(f.get("yanked") for f in files)}
    name = str(page["name"] or project)
    shown = _shown(version, list(by_version), yanked, name)
    infos = []
    for number in sorted(by_version, key=version_key, reverse=True)[:MAX_VERSIONS]:
        items = by_version[number]
        files = tuple(
            FileInfo(
                str(item["filename"]),
                item["size"] if isinstance(item.get("size"), int) else None,
                str(item["url"]),
                yanked=_yank_reason(item.get("yanked")),
                note=_file_note(str(item["filename"]), item.get("requires-python")),
                hashes=_hashes(_mapping(item.get("hashes"))),
            )
            for item in items
        )
        times = [t for t in (epoch_of(i.get("upload-time")) for i in items) if t is not None]
        reason = next((f.yanked for f in files if f.yanked is not None), None) if number in yanked else None
        infos.append(
            VersionInfo(number, min(times) if times else None, yanked=reason, size=_install_size(files), files=files)
        )
    requires_python = next(
        (str(i["requires-python"]) for i in by_version.get(shown or "", ()) if i.get("requires-python")), ""
    )
    index_url = f"{registry_url}/simple/"
    return PackagePage(
        name=name,
        proxied=True,
        version=shown,
        versions=tuple(infos),
        install=_install(name, shown, index_url),
        facts=_facts({}, requires_python, index_url),
        notes=(PROXIED_NOTE,),
    )


def metadata_file_of(page: PackagePage) -> str | None:
    """The file of the shown release whose core metadata tells its summary, README and
    dependencies: a pure-Python wheel, else any wheel (the sdist has no `.metadata` file)."""
    shown = page.shown_version()
    wheels = [f.filename for f in shown.files if f.filename.endswith(".whl")] if shown else []
    pure = [w for w in wheels if w.endswith("-none-any.whl")]
    found = pure or wheels
    return found[0] if found else None


def with_metadata(page: PackagePage, data: bytes) -> PackagePage:
    """A proxied project's page completed from its shown release's core metadata file (`data`,
    verified against the upstream's digest): summary, README, dependencies, license, links.
    Pure (core may run it off the event loop: a reStructuredText README takes docutils time)."""
    from batlehub_pypi.upload import parse_core_metadata, release_metadata

    metadata = release_metadata(parse_core_metadata(data, "core metadata"))
    readme, markup = readme_of(metadata)
    requires_python = metadata.get("requires_python")
    index_url = next(value for label, value in page.facts if label == "Index URL")
    return replace(
        page,
        description=str(metadata.get("summary") or ""),
        readme=readme,
        readme_markup=markup,
        dependencies=dependencies(metadata.get("requires_dist")),
        license=_license(metadata),
        links=_links(metadata),
        facts=_facts(metadata, requires_python if isinstance(requires_python, str) else "", index_url),
        notes=tuple(n for n in page.notes if n != PROXIED_NOTE),
    )


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _yank_reason(value: Any) -> str | None:
    if not value:
        return None
    return value if isinstance(value, str) else ""
