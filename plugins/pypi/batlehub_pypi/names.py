"""Python package names, versions and distribution file names, by the rules pip and uv apply.

A project is stored under its PEP 503 normalized name (`Foo_Bar` and `foo.bar` are `foo-bar`), a
version under its PEP 440 normal form (`1.0-RC1` is `1.0rc1`). Distribution file names are the
wheel (`name-version(-build)?-py-abi-platform.whl`) and sdist (`name-version.tar.gz`) forms, and
a file is accepted only when its name and version are the project's and the version's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import (
    InvalidName,
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from batlehub.api import BadRequest

PackageType = Literal["bdist_wheel", "sdist"]

MAX_NAME_LENGTH = 200
MAX_FILENAME_LENGTH = 255
_SAFE_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+!-]*$")


def normalize_name(name: str) -> str:
    """The PEP 503 normalized form of a valid project name; `BadRequest` for anything else."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise BadRequest(f"invalid project name {name[:MAX_NAME_LENGTH]!r}")
    try:
        return canonicalize_name(name, validate=True)
    except InvalidName:
        raise BadRequest(f"invalid project name {name!r}") from None


def normalize_version(version: str) -> str:
    """The PEP 440 normal form of a version; `BadRequest` for one that is not valid."""
    try:
        return str(Version(version))
    except ValueError:  # InvalidVersion, or an integer too long for Python to convert
        raise BadRequest(f"invalid version {version[:100]!r}: not a PEP 440 version") from None


def version_key(version: str) -> tuple[int, Version | str]:
    """Sorts versions as pip does; an invalid one (from an upstream) sorts first."""
    try:
        return (1, Version(version))
    except ValueError:  # InvalidVersion, or an integer too long for Python to convert
        return (0, version)


def is_prerelease(version: str) -> bool:
    try:
        return Version(version).is_prerelease
    except ValueError:  # InvalidVersion, or an integer too long for Python to convert
        return True


def latest_release(versions: Iterable[str], yanked: Collection[str]) -> str | None:
    """The release a bare `pip install` picks: the newest final one not yanked, else the newest
    not yanked, else the newest (None for none)."""
    ordered = sorted(versions, key=version_key)
    for candidates in (
        [v for v in ordered if v not in yanked and not is_prerelease(v)],
        [v for v in ordered if v not in yanked],
        ordered,
    ):
        if candidates:
            return candidates[-1]
    return None


@dataclass(frozen=True)
class DistFile:
    """What a distribution file's name says about it."""

    filename: str
    project: str
    """Normalized."""
    version: str
    """PEP 440 normal form."""
    packagetype: PackageType
    python_version: str
    """The wheel's Python tag (`py3`, `cp311.cp312`), `source` for an sdist."""


def check_safe_filename(filename: str) -> str:
    """A file name that can be one path segment and a storage lookup: what downloads accept, so
    an upstream's older formats (`.tar.bz2` sdists, eggs) still pass through a proxy."""
    if len(filename) > MAX_FILENAME_LENGTH or not _SAFE_FILENAME.match(filename) or ".." in filename:
        raise BadRequest(f"invalid distribution file name {filename[:MAX_FILENAME_LENGTH]!r}")
    return filename


def parse_filename(filename: str) -> DistFile:
    """A wheel or sdist file name, parsed; `BadRequest` for any other file or a malformed name."""
    check_safe_filename(filename)
    try:
        if filename.endswith(".whl"):
            name, version, _, tags = parse_wheel_filename(filename)
            pythons = sorted({tag.interpreter for tag in tags})
            return DistFile(filename, name, str(version), "bdist_wheel", ".".join(pythons))
        if filename.endswith((".tar.gz", ".zip")):
            name, version = parse_sdist_filename(filename)
            return DistFile(filename, name, str(version), "sdist", "source")
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion) as exc:
        raise BadRequest(f"invalid distribution file name {filename!r}: {exc}") from None
    raise BadRequest(f"unsupported file type {filename!r}: upload wheels (.whl) and sdists (.tar.gz)")


_OLDER_ARCHIVES = (".tar.bz2", ".tar.xz", ".tar.lz", ".tbz", ".tbz2", ".tgz", ".txz", ".tar", ".egg")
"""Distribution files of older formats that pip still installs (sdists in other archives, eggs),
whose names packaging's parsers refuse: `name-version` before the suffix (eggs: `-pyX.Y` after)."""


def file_version(filename: str) -> str | None:
    """The version a distribution file belongs to (PEP 440 normal form), as far as its name tells:
    wheels and sdists by packaging's rules, older archives (`.tar.bz2`, `.egg`, ...) by the first
    `-`-separated run of the name that is a valid version. None for a name that tells none (such a
    file cannot be resolved by an installer either). Policies decide by it."""
    try:
        return parse_filename(filename).version
    except BadRequest:
        pass
    lowered = filename.lower()
    suffix = next((s for s in _OLDER_ARCHIVES if lowered.endswith(s)), None)
    if suffix is None:
        return None
    parts = filename[: -len(suffix)].split("-")
    for start in range(1, len(parts)):
        for end in range(len(parts), start, -1):
            try:
                return str(Version("-".join(parts[start:end])))
            except InvalidVersion:
                continue
    return None


def version_id(version: str) -> str:
    """The PEP 440 normal form of a version, or the text itself when it is not valid (an
    upstream may list such versions)."""
    try:
        return str(Version(version))
    except InvalidVersion:
        return version


def pep440_range(text: str) -> Callable[[str], bool]:
    """A rule's version range for PyPI projects: PEP 440 specifiers (`>=2,<3`, `~=1.4`,
    `==1.2.*`, `!=1.3.1`), or a bare version for that version alone, with `||` between
    alternatives. Prereleases inside the range match too: a rule about `>=2,<3` is meant for
    `2.1b1` as much as for `2.1`. A version that is not PEP 440 matches no range. `ValueError`
    for a bad range."""
    alternatives: list[SpecifierSet] = []
    for part in text.split("||"):
        part = part.strip()
        if not part:
            raise ValueError(f"not a PEP 440 version range: {text!r} (an empty alternative)")
        try:
            alternatives.append(SpecifierSet(f"=={Version(part)}"))
            continue
        except InvalidVersion:
            pass
        try:
            alternatives.append(SpecifierSet(part))
        except InvalidSpecifier:
            raise ValueError(f"not a PEP 440 version range: {text!r}") from None

    def test(version: str) -> bool:
        try:
            parsed = Version(version)
        except InvalidVersion:
            return False
        return any(spec.contains(parsed, prereleases=True) for spec in alternatives)

    return test


def check_filename(filename: str, project: str, version: str) -> DistFile:
    """`parse_filename`, and the file must belong to `project` (normalized) at `version`."""
    parsed = parse_filename(filename)
    if parsed.project != project:
        raise BadRequest(f"file {filename} does not belong to project {project}: its name says {parsed.project}")
    if parsed.version != version:
        raise BadRequest(f"file {filename} does not belong to version {version}: its name says {parsed.version}")
    return parsed


def project_of_filename(filename: str) -> str | None:
    """The normalized project a distribution file name names, or None when it names none."""
    try:
        return parse_filename(filename).project
    except BadRequest:
        return None
