"""What a format tells the web UI about one package (the `package_page` hook), in words every
format shares: versions with their dates, tags, deprecations and yanks, files, owners,
dependencies, the README and the commands that install it.

Core renders these values; a format never writes HTML. Everything here may come from an upstream
registry, so core treats every string as untrusted: the README is rendered from Markdown and
sanitized, links are shown only for `http` and `https` URLs, and the rest is escaped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

README_MARKUPS = ("markdown", "html", "text")


@dataclass(frozen=True)
class Dependency:
    name: str
    requirement: str = ""
    """The range, as the format writes it (`^1.2.0`, `>=2,<3; python_version < "3.12"`)."""
    kind: str = ""
    """Its group: "" for what installing needs, else the format's word ("dev", "peer",
    "optional", a Python extra's name)."""


@dataclass(frozen=True)
class FileInfo:
    """A downloadable file of a version (npm: its tarball; Python: each wheel and the sdist)."""

    filename: str
    size: int | None = None
    """Bytes, when known (a proxied file the hub has not fetched may not say)."""
    url: str = ""
    """Where to download it from this hub; "" for none."""
    yanked: str | None = None
    """None unless yanked; then the reason ("" for none given)."""
    note: str = ""
    """One short line the format adds (a wheel's tags, a digest)."""
    hashes: Mapping[str, str] = field(default_factory=dict)
    """Algorithm -> hex digest a user can check the download against (`sha256`, ...), shown in
    full; empty for none."""


@dataclass(frozen=True)
class VersionInfo:
    version: str
    published: float | None = None
    """Epoch seconds, when known."""
    deprecated: str | None = None
    """None unless deprecated; then the message."""
    yanked: str | None = None
    """None unless the whole version is yanked; then the reason ("" for none given)."""
    size: int | None = None
    """The bytes a client downloads to install it, when known."""
    files: tuple[FileInfo, ...] = ()


@dataclass(frozen=True)
class PackagePage:
    """One package of one registry, as the web UI's package page shows it."""

    name: str
    proxied: bool
    """True for a package this hub caches from an upstream, False for one published here."""
    version: str | None
    """The version the page is about (the one asked for, else the latest); None for a package
    without versions."""
    description: str = ""
    readme: str = ""
    readme_markup: str = "markdown"
    """How `readme` is written: "markdown" (rendered, then sanitized), "html" (HTML the format
    rendered from its own markup, e.g. reStructuredText; sanitized like rendered Markdown) or
    "text" (shown as is)."""
    versions: tuple[VersionInfo, ...] = ()
    """Newest first."""
    tags: Mapping[str, str] = field(default_factory=dict)
    """Tag -> version (npm's dist-tags); empty for formats without tags."""
    owners: tuple[str, ...] = ()
    dependencies: tuple[Dependency, ...] = ()
    """Of `version`."""
    install: tuple[str, ...] = ()
    """Commands that install `version` with the format's clients, each shown with a copy button."""
    license: str = ""
    links: tuple[tuple[str, str], ...] = ()
    """(label, URL): homepage, repository, issues. Only http(s) URLs are shown."""
    facts: tuple[tuple[str, str], ...] = ()
    """(label, value) rows of what a user of the format expects to see (npm: engines; Python:
    Requires-Python)."""
    notes: tuple[str, ...] = ()
    """Short warnings shown on top (e.g. served from a stale copy while the upstream is down)."""

    def shown_version(self) -> VersionInfo | None:
        return next((v for v in self.versions if v.version == self.version), None)
