"""Synthetic npm packages for the benchmark, and publishing them through the npm registry API.

Publishing goes straight to `PUT /<name>` with the tarball base64-encoded in `_attachments`, the
body the npm CLI sends: hundreds of versions then take seconds instead of minutes of `npm publish`.
Everything is generated from a fixed seed, so two runs (and the three servers of one run) see the
same bytes.
"""

from __future__ import annotations

import base64
import concurrent.futures
import gzip
import hashlib
import http.client
import io
import json
import random
import tarfile
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchkit import BenchError

MANY_VERSIONS_NAME = "bench-many-versions"
BIG_TARBALL_NAME = "bench-big-tarball"
HUGE_PUBLISH_NAME = "bench-huge-publish"
TREE_PREFIX = "bench-tree-"
TREE_SCOPED_PREFIX = "@bench/tree-"
ONE_MIB = 1024 * 1024
SEED = 7


@dataclass(frozen=True)
class Release:
    """One published version: its manifest (with `dist`) and the exact tarball bytes."""

    name: str
    version: str
    manifest: dict[str, Any]
    tarball: bytes

    @property
    def unscoped(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @property
    def tarball_path(self) -> str:
        """Path of the tarball below a registry's base URL, the way npm registries lay it out."""
        return f"{self.name}/-/{self.unscoped}-{self.version}.tgz"

    @property
    def url_name(self) -> str:
        """The package name as one URL path segment (`@scope%2fname` for scoped names)."""
        return self.name.replace("/", "%2f")


@dataclass
class Dataset:
    many_versions: list[Release]
    big_tarball: Release
    tree: list[Release]
    project_dependencies: dict[str, str]
    releases_by_name: dict[str, list[Release]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for release in [*self.many_versions, self.big_tarball, *self.tree]:
            self.releases_by_name.setdefault(release.name, []).append(release)

    @property
    def package_count(self) -> int:
        return len(self.releases_by_name)

    @property
    def release_count(self) -> int:
        return sum(len(v) for v in self.releases_by_name.values())


# --- tarballs -------------------------------------------------------------------------------------


def make_tarball(files: dict[str, bytes], *, compresslevel: int = 6) -> bytes:
    """A gzipped tar with every file under `package/`, as `npm pack` lays it out (fixed mtimes)."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for path, content in files.items():
                info = tarfile.TarInfo(f"package/{path}")
                info.size = len(content)
                info.mode = 0o644
                info.mtime = 499162500  # what npm pack uses (1985-10-26)
                tar.addfile(info, io.BytesIO(content))
    return raw.getvalue()


def integrity_of(data: bytes) -> tuple[str, str]:
    """(sha512 SRI string, hex sha1): the `dist.integrity` and `dist.shasum` npm clients verify."""
    sri = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    return sri, hashlib.sha1(data).hexdigest()


def _manifest(name: str, version: str, dependencies: dict[str, str], rng: random.Random) -> dict[str, Any]:
    """A version manifest about as rich as a typical one on a public registry (a few hundred bytes
    of metadata besides `dist`), so document sizes and serialization costs are realistic."""
    unscoped = name.rsplit("/", 1)[-1]
    words = ["fast", "tiny", "stream", "parse", "util", "async", "json", "cli", "http", "cache"]
    return {
        "name": name,
        "version": version,
        "description": f"Synthetic benchmark package {name}: {' '.join(rng.sample(words, 4))}",
        "main": "index.js",
        "types": "index.d.ts",
        "scripts": {"test": "node test.js", "build": "tsc -p .", "lint": "eslint ."},
        "repository": {"type": "git", "url": f"git+https://git.example.invalid/bench/{unscoped}.git"},
        "homepage": f"https://git.example.invalid/bench/{unscoped}#readme",
        "bugs": {"url": f"https://git.example.invalid/bench/{unscoped}/issues"},
        "keywords": rng.sample(words, 5),
        "author": {"name": "Bench Author", "email": "bench@example.invalid"},
        "license": "MIT",
        "engines": {"node": ">=18"},
        "files": ["index.js", "index.d.ts"],
        "dependencies": dependencies,
        "devDependencies": {"typescript": "^5.4.0", "eslint": "^9.1.0", "prettier": "^3.2.0"},
    }


def make_release(
    name: str,
    version: str,
    dependencies: dict[str, str] | None = None,
    *,
    payload_size: int = 0,
    rng: random.Random,
    compresslevel: int = 6,
) -> Release:
    """A release whose tarball holds package.json, index.js, index.d.ts and `payload_size` random
    bytes (incompressible, so the tarball is about that big)."""
    manifest = _manifest(name, version, dict(dependencies or {}), rng)
    files = {
        "package.json": json.dumps(manifest, indent=2).encode(),
        "index.js": f"module.exports = {json.dumps(name + '@' + version)};\n".encode(),
        "index.d.ts": b"declare const id: string;\nexport = id;\n",
    }
    if payload_size:
        files["payload.bin"] = rng.randbytes(payload_size)
    tarball = make_tarball(files, compresslevel=compresslevel)
    integrity, shasum = integrity_of(tarball)
    manifest["dist"] = {"integrity": integrity, "shasum": shasum, "tarball": "", "fileCount": len(files)}
    manifest["_id"] = f"{name}@{version}"
    return Release(name, version, manifest, tarball)


def _semver(index: int) -> str:
    return f"{index // 100 + 1}.{index // 10 % 10}.{index % 10}"


def build_dataset(*, versions: int = 300, tree_size: int = 150) -> Dataset:
    """The packages every server gets: one package with `versions` versions (small tarballs), one
    with a 1 MiB tarball, and `tree_size` packages that depend on each other so that installing
    `project_dependencies` pulls in all of them."""
    rng = random.Random(SEED)
    tree_names = [f"{TREE_SCOPED_PREFIX}{i:03d}" if i % 7 == 3 else f"{TREE_PREFIX}{i:03d}" for i in range(tree_size)]
    # A DAG: each package depends on 0-3 packages with a higher index; the project depends on the
    # first ten and on every package nothing else depends on, so the tree is exactly tree_size.
    deps: dict[int, list[int]] = {i: [] for i in range(tree_size)}
    for i in range(tree_size):
        later = list(range(i + 1, tree_size))
        deps[i] = sorted(rng.sample(later, min(len(later), rng.randint(0, 3))))
    depended_on = {j for d in deps.values() for j in d}
    roots = sorted(set(range(min(10, tree_size))) | (set(range(tree_size)) - depended_on))
    tree = [
        make_release(tree_names[i], "1.0.0", {tree_names[j]: "^1.0.0" for j in deps[i]}, rng=rng)
        for i in range(tree_size)
    ]
    many = [
        make_release(MANY_VERSIONS_NAME, _semver(i), {tree_names[0]: "^1.0.0", tree_names[1]: "^1.0.0"}, rng=rng)
        for i in range(versions)
    ]
    # Incompressible payload sized so that the whole .tgz is just about 1 MiB.
    big = make_release(BIG_TARBALL_NAME, "1.0.0", payload_size=ONE_MIB - 3 * 1024, rng=rng, compresslevel=1)
    return Dataset(many, big, tree, {tree_names[i]: "^1.0.0" for i in roots})


def write_huge_tarball(path: Path, size: int) -> Release:
    """A release with a tarball of about `size` bytes, written to `path` (too big to keep twice)."""
    release = make_release(
        HUGE_PUBLISH_NAME, "1.0.0", payload_size=size - 4096, rng=random.Random(SEED + 1), compresslevel=1
    )
    path.write_bytes(release.tarball)
    return release


# --- publishing -----------------------------------------------------------------------------------


def tarball_url(registry_url: str, release: Release) -> str:
    return registry_url.rstrip("/") + "/" + release.tarball_path


def publish_document(registry_url: str, release: Release, *, attachment: bool = True) -> dict[str, Any]:
    """The JSON the npm CLI PUTs for one version (without the attachment data when not asked)."""
    manifest = json.loads(json.dumps(release.manifest))
    manifest["dist"]["tarball"] = tarball_url(registry_url, release)
    document: dict[str, Any] = {
        "_id": release.name,
        "name": release.name,
        "description": manifest["description"],
        "dist-tags": {"latest": release.version},
        "versions": {release.version: manifest},
        "readme": f"# {release.name}\n\nA synthetic package for the BatleHub benchmark.\n",
        "access": None,
    }
    if attachment:
        document["_attachments"] = {
            f"{release.name}-{release.version}.tgz": {
                "content_type": "application/octet-stream",
                "data": base64.b64encode(release.tarball).decode(),
                "length": len(release.tarball),
            }
        }
    return document


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise BenchError(f"only plain http registry URLs are supported here, got {url}")
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout), parts.path


def put(url: str, token: str, body: Any, *, length: int | None = None, timeout: float = 300) -> tuple[int, bytes]:
    """PUT `body` (bytes, or a binary file object sent in 1 MiB blocks with `length`)."""
    conn, path = _connection(url, timeout)
    conn.blocksize = ONE_MIB
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {token}",
        "Content-Length": str(length if length is not None else len(body)),
        "npm-command": "publish",
    }
    try:
        conn.request("PUT", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def publish_release(registry_url: str, token: str, release: Release) -> None:
    url = registry_url.rstrip("/") + "/" + release.url_name
    body = json.dumps(publish_document(registry_url, release)).encode()
    status, answer = put(url, token, body)
    if status not in (200, 201):
        raise BenchError(
            f"publishing {release.name}@{release.version} to {registry_url} failed: "
            f"HTTP {status} {answer[:500].decode(errors='replace')}"
        )


def publish_all(
    registry_url: str,
    token: str,
    dataset: Dataset,
    *,
    parallel: int = 6,
    progress: Callable[[str], None] = lambda _: None,
) -> None:
    """Publish every release; versions of one package in order, different packages in parallel."""

    def one_package(releases: Iterable[Release]) -> int:
        count = 0
        for release in releases:
            publish_release(registry_url, token, release)
            count += 1
        return count

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        # The long sequential package first, so it overlaps with everything else.
        ordered = sorted(dataset.releases_by_name.values(), key=len, reverse=True)
        futures = [pool.submit(one_package, releases) for releases in ordered]
        done = 0
        for future in concurrent.futures.as_completed(futures):
            done += future.result()
    progress(f"published {done} versions of {dataset.package_count} packages to {registry_url}")


def stream_publish_body(registry_url: str, release: Release, tarball_file: Path, body_file: Path) -> int:
    """Write the publish JSON for a big tarball to `body_file`, base64-encoding the tarball in
    chunks, and return its length, so the client never holds the whole body in memory."""
    document = publish_document(registry_url, release, attachment=False)
    document["_attachments"] = {
        f"{release.name}-{release.version}.tgz": {
            "content_type": "application/octet-stream",
            "data": "@@DATA@@",
            "length": tarball_file.stat().st_size,
        }
    }
    head, tail = json.dumps(document).split("@@DATA@@")
    chunk = 3 * 256 * 1024  # a multiple of 3: chunks encode without padding in the middle
    with open(body_file, "wb") as out, open(tarball_file, "rb") as src:
        out.write(head.encode())
        while block := src.read(chunk):
            out.write(base64.b64encode(block))
        out.write(tail.encode())
    return body_file.stat().st_size
