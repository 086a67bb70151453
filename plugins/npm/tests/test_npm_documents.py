"""Documents: tarball URLs always point at the hub, the abbreviated form carries what installs
need and nothing else, ETags change exactly when the content may."""

from __future__ import annotations

import gzip
import json

from batlehub_npm import documents
from batlehub_npm.names import PackageName

from batlehub.api import Package, Rendered, RenderedCache, VersionRecord, etag_matches, revision_etag

BASE = "https://hub.example.test"
REGISTRY_URL = f"{BASE}/registries/npm"

UPSTREAM = {
    "_id": "@s/p",
    "_rev": "12-abc",
    "name": "@s/p",
    "dist-tags": {"latest": "1.0.0"},
    "readme": "long readme",
    "time": {"modified": "2024-01-01T00:00:00.000Z", "1.0.0": "2024-01-01T00:00:00.000Z"},
    "versions": {
        "1.0.0": {
            "name": "@s/p",
            "version": "1.0.0",
            "readme": "long readme",
            "scripts": {"postinstall": "node x.js", "test": "x"},
            "dependencies": {"a": "^1"},
            "engines": {"node": ">=18"},
            "dist": {
                "tarball": "http://upstream.test/@s/p/-/p-1.0.0.tgz",
                "shasum": "0" * 40,
                "integrity": "sha512-AAAA",
            },
        }
    },
    "_attachments": {},
}


def test_proxied_documents_point_every_tarball_at_the_hub_and_leave_the_input_alone() -> None:
    doc = documents.proxied_packument(UPSTREAM, PackageName("@s/p"), REGISTRY_URL, abbreviated=False)
    assert doc["versions"]["1.0.0"]["dist"]["tarball"] == f"{BASE}/registries/npm/@s/p/-/p-1.0.0.tgz"
    assert doc["versions"]["1.0.0"]["dist"]["integrity"] == "sha512-AAAA"
    assert "_attachments" not in doc
    assert UPSTREAM["versions"]["1.0.0"]["dist"]["tarball"].startswith("http://upstream.test/")
    assert "upstream.test" not in json.dumps(doc)


def test_abbreviated_form_keeps_install_fields_only() -> None:
    doc = documents.proxied_packument(UPSTREAM, PackageName("@s/p"), REGISTRY_URL, abbreviated=True)
    assert set(doc) == {"name", "modified", "dist-tags", "versions", "time"}
    version = doc["versions"]["1.0.0"]
    assert "readme" not in version and "scripts" not in version
    assert version["hasInstallScript"] is True
    assert version["dependencies"] == {"a": "^1"} and version["engines"] == {"node": ">=18"}
    assert version["dist"]["tarball"].startswith(BASE)


def local_package(revision: int = 1) -> Package:
    return Package(
        name="mine",
        revision=revision,
        created=1700000000.5,
        modified=1700000100.25,
        extra={"description": "d", "readme": "# mine"},
        versions=(
            VersionRecord("1.0.0", {"name": "mine", "version": "1.0.0", "dist": {"shasum": "1" * 40}}, 1700000000.5),
            VersionRecord("1.1.0", {"name": "mine", "version": "1.1.0", "deprecated": "old"}, 1700000100.25),
        ),
        tags={"latest": "1.1.0"},
        owners=("alice",),
    )


def test_local_packument_full_and_abbreviated() -> None:
    full = documents.local_packument(local_package(), REGISTRY_URL, abbreviated=False)
    assert full["_rev"].startswith("1-") and full["_id"] == "mine"
    assert full["maintainers"] == [{"name": "alice", "email": ""}]
    assert full["time"]["1.0.0"] == "2023-11-14T22:13:20.500Z"
    assert full["versions"]["1.1.0"]["dist"]["tarball"] == f"{BASE}/registries/npm/mine/-/mine-1.1.0.tgz"
    short = documents.local_packument(local_package(), REGISTRY_URL, abbreviated=True)
    assert "readme" not in json.dumps(short) and short["versions"]["1.1.0"]["deprecated"] == "old"
    assert documents.version_document(full, "latest")["version"] == "1.1.0"
    assert documents.version_document(full, "9.9.9") is None


def test_rev_and_etags_follow_the_revision() -> None:
    one, two = local_package(1), local_package(2)
    assert documents.make_rev(one.name, one.created, one.revision) != documents.make_rev(
        two.name, two.created, two.revision
    )
    etag = revision_etag(one.stamp, "full", BASE)
    assert etag == revision_etag(one.stamp, "full", BASE)
    assert etag != revision_etag(two.stamp, "full", BASE)
    assert etag != revision_etag(one.stamp, "abbreviated", BASE)
    assert etag != revision_etag(one.stamp, "full", "http://other:8080")
    assert etag_matches(f'W/{etag}, "x"', etag)
    assert not etag_matches('"x"', etag)


def test_accept_header_picks_the_abbreviated_form() -> None:
    npm = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"
    assert documents.wants_abbreviated(npm)
    assert not documents.wants_abbreviated("application/json")
    assert not documents.wants_abbreviated("application/vnd.npm.install-v1+json;q=0")


def test_rendered_cache_is_bounded_and_forgets_packages() -> None:
    cache = RenderedCache(max_bytes=1000)
    for i in range(20):
        cache.put((f"p{i}", "1", "full"), Rendered.of(b"x" * 100, f'"{i}"', "application/json"))
    assert cache.get(("p0", "1", "full")) is None
    assert cache.get(("p19", "1", "full")) is not None
    cache.drop_package("p19")
    assert cache.get(("p19", "1", "full")) is None
    item = Rendered.of(b'{"a":1}' * 300, '"e"', "application/json")
    assert item.gzip_body is not None and gzip.decompress(item.gzip_body) == item.body
