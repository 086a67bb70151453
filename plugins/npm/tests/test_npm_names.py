"""Package names and request paths: both spellings of scoped names, and nothing that could walk
out of a namespace."""

from __future__ import annotations

import pytest
from batlehub_npm.names import (
    latest_version,
    parse_package_name,
    parse_route,
    split_spec,
    validate_tag,
    validate_version,
    version_sort_key,
)

from batlehub.errors import BadRequest


@pytest.mark.parametrize(
    ("raw", "kind", "name", "version"),
    [
        ("lodash", "package", "lodash", None),
        ("@scope%2fpkg", "package", "@scope/pkg", None),
        ("@scope%2Fpkg", "package", "@scope/pkg", None),
        ("%40scope%2fpkg", "package", "@scope/pkg", None),
        ("@scope/pkg", "package", "@scope/pkg", None),
        ("@scope/pkg/1.2.3", "version", "@scope/pkg", "1.2.3"),
        ("@scope%2fpkg/latest", "version", "@scope/pkg", "latest"),
        ("pkg/-/pkg-1.0.0-beta.1.tgz", "tarball", "pkg", "1.0.0-beta.1"),
        ("@scope/pkg/-/pkg-2.0.0.tgz", "tarball", "@scope/pkg", "2.0.0"),
        ("@scope%2fpkg/-/pkg-2.0.0.tgz", "tarball", "@scope/pkg", "2.0.0"),
        ("pkg/-/pkg-1.0.0.tgz/-rev/3-abc", "tarball_rev", "pkg", "1.0.0"),
        ("-/package/@scope%2fpkg/dist-tags", "dist_tags", "@scope/pkg", None),
        ("-/package/@scope/pkg/dist-tags/next", "dist_tags", "@scope/pkg", "next"),
    ],
)
def test_routes_read_both_spellings_of_scoped_names(raw: str, kind: str, name: str, version: str | None) -> None:
    route = parse_route(raw)
    assert (route.kind, route.package.name if route.package else None, route.version) == (kind, name, version)


def test_rev_forms_keep_the_revision() -> None:
    assert parse_route("@s%2fp/-rev/4-0123").rev == "4-0123"
    assert parse_route("@s/p/-rev/4-0123").kind == "package_rev"


@pytest.mark.parametrize(
    ("raw", "kind", "extra"),
    [
        ("-/ping", "ping", None),
        ("-/whoami", "whoami", None),
        ("-/v1/search", "search", None),
        ("-/v1/login", "web_login", None),
        ("-/user/org.couchdb.user:alice", "login", "alice"),
        ("-/user/token/bh_abc", "logout", "bh_abc"),
        ("-/npm/v1/security/advisories/bulk", "audit", "advisories/bulk"),
        ("-/nothing", "unknown", None),
    ],
)
def test_special_endpoints(raw: str, kind: str, extra: str | None) -> None:
    route = parse_route(raw)
    assert (route.kind, route.extra) == (kind, extra)


@pytest.mark.parametrize(
    "raw",
    [
        "..",
        "%2e%2e",
        "%2E%2E/etc",
        "..%2fetc%2fpasswd",
        "@scope%2f..",
        "@..%2fpkg",
        "pkg%00",
        "pkg%5c..%5cx",
        "pkg/..%2f..%2fx",
        "pkg/-/pkg-..%2f1.0.0.tgz",
        "%252e%252e",
        ".hidden",
        "_private",
        "foo%2fbar",
        "@scope",
        "-/package/..%2f..%2fx/dist-tags",
    ],
)
def test_traversal_and_invalid_names_are_400(raw: str) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_route(raw)
    assert refused.value.status == 400
    assert refused.value.message  # a clear message, not an empty error


def test_new_packages_must_be_lowercase_but_old_names_can_be_read() -> None:
    assert parse_package_name("JSONStream").name == "JSONStream"
    with pytest.raises(BadRequest, match="lowercase"):
        parse_package_name("JSONStream", new=True)
    with pytest.raises(BadRequest, match="reserved"):
        parse_package_name("node_modules", new=True)
    with pytest.raises(BadRequest, match="214"):
        parse_package_name("a" * 215)


def test_versions_tags_and_ordering() -> None:
    assert validate_version("1.0.0-rc.1+build.5") == "1.0.0-rc.1+build.5"
    for bad in ("1.0", "v1.0.0", "01.0.0", "1.0.0/../x", ""):
        with pytest.raises(BadRequest):
            validate_version(bad)
    assert validate_tag("next") == "next"
    for bad in ("1.2.3", "v2", "a/b", ""):
        with pytest.raises(BadRequest):
            validate_tag(bad)
    versions = ["1.0.0", "1.10.0", "1.2.0", "2.0.0-beta.2", "2.0.0-beta.10", "1.10.0-rc.1"]
    assert sorted(versions, key=version_sort_key) == [
        "1.0.0",
        "1.2.0",
        "1.10.0-rc.1",
        "1.10.0",
        "2.0.0-beta.2",
        "2.0.0-beta.10",
    ]
    assert latest_version(versions) == "1.10.0"  # a release beats newer prereleases
    assert latest_version(["2.0.0-beta.2", "2.0.0-beta.10"]) == "2.0.0-beta.10"
    assert split_spec("@s/p@1.0.0") == ("@s/p", "1.0.0")
    assert split_spec("@s/p") == ("@s/p", None)
