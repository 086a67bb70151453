"""npm package names, versions, dist-tags and request paths.

Everything that comes from a URL or a request body and later names a database row or a storage
key passes through here first. Names that try to escape their namespace (`..`, `%2e%2e`, NUL,
backslash, stray slashes) are refused with a 400 before any storage or database is touched.

Scoped names reach the registry in two spellings, `/@scope%2fname` (what npm sends) and
`/@scope/name` (some clients, and the tarball URLs we hand out); `parse_route` accepts both by
reading the *raw* path, segment by segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from batlehub.api import BadRequest, InvalidKey, decode_path_segment, refuse_path_escape

MAX_NAME_LENGTH = 214
AUDIT_ENDPOINTS = frozenset({"advisories/bulk", "audits/quick", "audits"})
MAX_VERSION_LENGTH = 256
MAX_TAG_LENGTH = 128

# Characters that encodeURIComponent leaves alone: what npm allows in names of old packages.
_OLD_NAME_CHARS = re.compile(r"^[A-Za-z0-9\-_.!~*'()]+$")
# New packages: lowercase and URL-safe.
_NEW_NAME_CHARS = re.compile(r"^[a-z0-9\-_.~]+$")
_RESERVED_NEW_NAMES = frozenset({"node_modules", "favicon.ico"})

_SEMVER = re.compile(
    r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$",
    re.ASCII,  # \d must not match other scripts' digits ("1\u0661.0.0" is no version)
)
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-_.~]*$")


class InvalidPackageName(BadRequest):
    """A package name npm would not accept."""


@dataclass(frozen=True)
class PackageName:
    """A validated npm package name, `name` or `@scope/name`."""

    name: str

    @property
    def scope(self) -> str | None:
        """`@scope` for scoped names, else None."""
        return self.name.split("/", 1)[0] if self.name.startswith("@") else None

    @property
    def basename(self) -> str:
        """The part after the scope: what tarball file names start with."""
        return self.name.rsplit("/", 1)[-1]

    @property
    def escaped(self) -> str:
        """The name as npm puts it in a URL (`@scope%2fname`)."""
        return self.name.replace("/", "%2f")

    def tarball_filename(self, version: str) -> str:
        return f"{self.basename}-{version}.tgz"

    def __str__(self) -> str:
        return self.name


def parse_package_name(text: str, *, new: bool = False) -> PackageName:
    """Validate a decoded package name. `new=True` applies the stricter rules for publishing
    (lowercase only, no `~)('!*`), the way npm itself checks names of new packages."""
    if not isinstance(text, str) or not text:
        raise InvalidPackageName("package name must not be empty")
    refuse_path_escape(text, "package name")
    if len(text) > MAX_NAME_LENGTH:
        raise InvalidPackageName(f"invalid package name: longer than {MAX_NAME_LENGTH} characters")
    if text != text.strip():
        raise InvalidPackageName(f"invalid package name {text!r}: leading or trailing spaces")
    if text.startswith("@"):
        scope, sep, base = text[1:].partition("/")
        if not sep or not scope or not base or "/" in base:
            raise InvalidPackageName(f"invalid package name {text!r}: a scoped name looks like @scope/name")
        parts = [scope, base]
    else:
        if "/" in text:
            raise InvalidPackageName(f"invalid package name {text!r}: only scoped names contain a slash")
        parts = [text]
    for part in parts:
        if part.startswith((".", "_")):
            raise InvalidPackageName(f"invalid package name {text!r}: must not start with . or _")
        pattern = _NEW_NAME_CHARS if new else _OLD_NAME_CHARS
        if not pattern.match(part):
            rule = "lowercase letters, digits, - . _ ~" if new else "URL-safe characters"
            raise InvalidPackageName(f"invalid package name {text!r}: only {rule} are allowed")
    if new and text in _RESERVED_NEW_NAMES:
        raise InvalidPackageName(f"invalid package name {text!r}: that name is reserved")
    return PackageName(text)


def is_semver(text: str) -> bool:
    return isinstance(text, str) and len(text) <= MAX_VERSION_LENGTH and bool(_SEMVER.match(text))


def validate_version(text: str) -> str:
    """A strict semver version (npm normalizes versions before publishing)."""
    if not isinstance(text, str) or not text:
        raise BadRequest("version must be a non-empty string")
    refuse_path_escape(text, "version")
    if not is_semver(text) or text.startswith("v"):
        raise BadRequest(f"invalid version {text!r}: expected a semver version such as 1.2.3")
    return text


def validate_tag(text: str) -> str:
    """A dist-tag: URL-safe, and not something npm would read as a version or range."""
    if not isinstance(text, str) or not text:
        raise BadRequest("dist-tag must be a non-empty string")
    refuse_path_escape(text, "dist-tag")
    if len(text) > MAX_TAG_LENGTH or not _TAG.match(text):
        raise BadRequest(f"invalid dist-tag {text!r}: use letters, digits, - . _ ~")
    if is_semver(text) or re.match(r"^v?\d+(\.\d+)?$", text, re.ASCII):
        raise BadRequest(f"invalid dist-tag {text!r}: a tag must not look like a version")
    return text


def validate_version_or_tag(text: str) -> str:
    refuse_path_escape(text, "version or tag")
    if is_semver(text):
        return text
    return validate_tag(text)


def version_sort_key(version: str) -> tuple[object, ...]:
    """Orders versions the semver way (prereleases before their release); unparsable last-ish."""
    match = _SEMVER.match(version)
    if not match:
        return (-1, -1, -1, 0, ())
    major, minor, patch, pre, _build = match.groups()
    if pre is None:
        pre_key: tuple[object, ...] = ((2,),)  # a release sorts after all of its prereleases
    else:
        pre_key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (int(major), int(minor), int(patch), 1 if pre is None else 0, pre_key)


def latest_version(versions: list[str]) -> str | None:
    """The highest release version, or the highest prerelease when there is no release."""
    if not versions:
        return None
    releases = [v for v in versions if _SEMVER.match(v) and _SEMVER.match(v).group(4) is None]  # type: ignore[union-attr]
    return max(releases or versions, key=version_sort_key)


def tarball_version(package: PackageName, filename: str) -> str:
    """The version inside `<basename>-<version>.tgz`; 404-worthy names raise BadRequest."""
    prefix = package.basename + "-"
    if not filename.startswith(prefix) or not filename.endswith(".tgz"):
        raise BadRequest(f"tarball {filename!r} does not belong to package {package.name!r}")
    return validate_version(filename[len(prefix) : -len(".tgz")])


# --- routes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """What a request path under `/registries/{name}/` asks for."""

    kind: str
    """One of: package, package_rev, version, tarball, tarball_rev, dist_tags, ping, whoami, search,
    web_login, login, logout, audit, stars, unknown."""
    package: PackageName | None = None
    version: str | None = None
    """A version or tag for `version`, the version of a tarball, the tag for `dist_tags`."""
    filename: str | None = None
    rev: str | None = None
    extra: str | None = None
    """The user name for `login`, the token for `logout`, the sub-path for `audit`."""
    segments: tuple[str, ...] = field(default=())


def _take_package(segments: list[str]) -> tuple[PackageName, list[str]]:
    """Read the package name off the front of the decoded segments (`@scope/name` may be one
    segment with an encoded slash, or two)."""
    first = segments[0]
    if first.startswith("@") and "/" not in first:
        if len(segments) < 2:
            raise InvalidPackageName(f"invalid package name {first!r}: a scoped name looks like @scope/name")
        return parse_package_name(f"{first}/{segments[1]}"), segments[2:]
    return parse_package_name(first), segments[1:]


def parse_route(raw_path: str) -> Route:
    """Parse the raw (still percent-encoded) path below the registry's prefix, without leading `/`.

    Each segment is decoded once; a decoded segment may contain a slash only where a scoped
    package name is expected.
    """
    raw_path = raw_path.lstrip("/")
    if not raw_path:
        return Route("unknown")
    try:
        segments = [decode_path_segment(s) for s in raw_path.split("/")]
    except UnicodeDecodeError:
        raise BadRequest("invalid path: not UTF-8") from None
    if segments and segments[-1] == "" and len(segments) > 1:
        segments = segments[:-1]  # tolerate one trailing slash
    if segments[0] == "-":
        return _special_route(segments)
    package, rest = _take_package(segments)
    for segment in rest:
        if "/" in segment:
            raise InvalidKey("invalid path: encoded slashes are not allowed outside a scoped package name")
        refuse_path_escape(segment, "path segment")
    if not rest:
        return Route("package", package)
    if len(rest) == 1:
        return Route("version", package, version=validate_version_or_tag(rest[0]))
    if len(rest) == 2 and rest[0] == "-rev":
        return Route("package_rev", package, rev=rest[1])
    if len(rest) == 2 and rest[0] == "-":
        return Route("tarball", package, version=tarball_version(package, rest[1]), filename=rest[1])
    if len(rest) == 4 and rest[0] == "-" and rest[2] == "-rev":
        return Route("tarball_rev", package, version=tarball_version(package, rest[1]), filename=rest[1], rev=rest[3])
    return Route("unknown", package)


def _special_route(segments: list[str]) -> Route:
    rest = segments[1:]
    if rest == ["ping"]:
        return Route("ping")
    if rest == ["whoami"]:
        return Route("whoami")
    if rest == ["v1", "search"]:
        return Route("search")
    if rest[:2] == ["v1", "login"]:
        return Route("web_login")
    if rest == ["v1", "done"]:
        return Route("web_login_done")
    if rest[:2] == ["_view", "starredByUser"]:
        return Route("stars")
    if len(rest) >= 2 and rest[0] == "user" and rest[1].startswith("org.couchdb.user:"):
        return Route("login", extra=rest[1][len("org.couchdb.user:") :])
    if len(rest) == 3 and rest[:2] == ["user", "token"]:
        return Route("logout", extra=rest[2])
    if len(rest) >= 4 and rest[:3] == ["npm", "v1", "security"]:
        sub = "/".join(rest[3:])
        # Only the audit endpoints npm calls: the rest of the path is forwarded upstream.
        return Route("audit", extra=sub) if sub in AUDIT_ENDPOINTS else Route("unknown", segments=tuple(segments))
    if len(rest) >= 3 and rest[0] == "package":
        package, tail = _take_package(rest[1:])
        if tail == ["dist-tags"]:
            return Route("dist_tags", package)
        if len(tail) == 2 and tail[0] == "dist-tags":
            return Route("dist_tags", package, version=validate_tag(tail[1]))
    return Route("unknown", segments=tuple(segments))


def split_spec(spec: str) -> tuple[str, str | None]:
    """Split `name@version` (`@scope/name@version` too) into name and version (None if absent)."""
    at = spec.find("@", 1)
    if at == -1:
        return spec, None
    return spec[:at], spec[at + 1 :]


_TOKEN_PATH = re.compile(r"^(/-/user/token/)[^/?]+")


def redact_path(raw_path: str) -> str:
    """`npm logout` puts the token in the URL (`/-/user/token/<token>`): never let a log show it."""
    return _TOKEN_PATH.sub(r"\1<redacted>", raw_path)


def scope_of(name: str) -> str | None:
    """`@scope` of `@scope/name`, None for an unscoped name (core keeps owners of scopes)."""
    return name.split("/", 1)[0] if name.startswith("@") and "/" in name else None


def normalize_name(text: str) -> str:
    """A package name, or a bare `@scope`, as the admin API may name them."""
    if text.startswith("@") and "/" not in text:
        parse_package_name(f"{text}/x")  # the scope part obeys the same rules
        return text
    return parse_package_name(text).name
