"""A real-world-shaped npm corpus, generated offline from a fixed seed, and the static upstream
that serves it.

Public registries hold a few packuments far bigger than the rest, and an ordinary install pulls
several of them in along with a few hundred small packages. The corpus reproduces that shape:

- big packuments with the version counts and document sizes of `react`, `typescript`, `next` and
  `@types/node` (`BIG_SHAPES`: ~2,400 to ~3,000 versions; `next` about 20 MB full and 16 MB
  abbreviated). Every version is a real manifest with a real (tiny) tarball; the bulk of each
  version is what makes those documents big in real life: long dependency and devDependency maps
  (kept in the abbreviated form), and descriptions, scripts and maintainers (full form only);
- `axios`, a mid-sized packument (~110 versions, ~120 kB abbreviated): the load tests' document;
- `bench-big-tarball` with one ~1 MiB incompressible tarball;
- two dependency trees of small packages (`TREE_SIZE` each, 2-60 versions, tarballs of 0.3-40 kB),
  scoped and unscoped, each a DAG whose roots a project depends on. Project `one` installs tree A
  with `next` and `react`, project `two` tree B with `typescript` and `@types/node`; `all` both.

`write()` lays it out on disk as the upstream serves it (`docs/<name>.json`, scoped names with
`%2f`, and `tarballs/<name>/-/<file>.tgz`), with absolute tarball URLs on the given upstream
port. `UPSTREAM_SCRIPT` is that server (aiohttp, sendfile), run as its own process; it counts
requests per method and path (`GET /-/bench/stats`) so a scenario can tell what the hub fetched again.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchkit.packages import ONE_MIB, integrity_of, make_tarball

SEED = 14
TREE_SIZE = 225
"""Packages per tree: two trees, so a project of both with the big four is ~454 packages."""


@dataclass(frozen=True)
class Shape:
    name: str
    versions: int
    full_bytes: int
    abbreviated_bytes: int
    prerelease_share: int = 0
    """One version in `prerelease_share` is a release, the others canaries (0: all releases)."""


BIG_SHAPES = (
    Shape("react", 2400, 6_500_000, 3_000_000, prerelease_share=4),
    Shape("typescript", 3000, 15_000_000, 5_000_000, prerelease_share=3),
    Shape("next", 3000, 20_000_000, 16_000_000, prerelease_share=5),
    Shape("@types/node", 2000, 9_000_000, 3_500_000),
)
MID_SHAPE = Shape("axios", 110, 330_000, 120_000)
BIG_TARBALL_NAME = "bench-big-tarball"

_WORDS = (
    "react compiler server client stream render hydrate suspense router cache fetch module bundle "
    "types node buffer crypto worker thread async hook effect state memo context portal event"
).split()


@dataclass
class Package:
    name: str
    document: dict[str, Any]
    tarballs: dict[str, bytes] = field(default_factory=dict)
    """file name -> bytes"""

    @property
    def url_name(self) -> str:
        return self.name.replace("/", "%2f")

    @property
    def latest(self) -> str:
        return str(self.document["dist-tags"]["latest"])


@dataclass
class Corpus:
    root: Path
    upstream_url: str
    packages: dict[str, Package]
    projects: dict[str, dict[str, str]]
    """project name -> its package.json dependencies"""
    tree_names: dict[str, list[str]]
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    """name -> {"full": bytes of the upstream document, "abbreviated": its abbreviated form,
    "versions": count} for the big and mid packages."""

    def expected_installed(self, project: str) -> int:
        return len(self.closure(project))

    def closure(self, project: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.projects[project])
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            package = self.packages[name]
            manifest = package.document["versions"][package.latest]
            todo += list(manifest.get("dependencies", {}))
        return seen

    def tarball_path(self, name: str) -> Path:
        package = self.packages[name]
        unscoped = name.rsplit("/", 1)[-1]
        return self.root / "tarballs" / name / "-" / f"{unscoped}-{package.latest}.tgz"

    def bytes_of(self, project: str) -> int:
        """Upstream bytes a project's install fetches: each package's document and latest tarball."""
        total = 0
        for name in self.closure(project):
            total += (self.root / "docs" / f"{self.packages[name].url_name}.json").stat().st_size
            total += self.tarball_path(name).stat().st_size
        return total


def _version(i: int, shape: Shape) -> str:
    base = f"{i // 400 + 1}.{i // 20 % 20}.{i % 20}"
    if shape.prerelease_share and i % shape.prerelease_share != 0:
        return f"{base}-canary.{i}"
    return base


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _tiny_tarball(name: str, version: str, rng: random.Random, payload: int = 0) -> bytes:
    files = {
        "package.json": json.dumps({"name": name, "version": version, "main": "index.js"}).encode(),
        "index.js": f"module.exports = {json.dumps(name + '@' + version)};\n".encode(),
    }
    if payload:
        files["payload.bin"] = rng.randbytes(payload)
    return make_tarball(files, compresslevel=1)


def _manifest(name: str, version: str, tarball: bytes, upstream: str, dependencies: dict[str, str]) -> dict[str, Any]:
    unscoped = name.rsplit("/", 1)[-1]
    integrity, shasum = integrity_of(tarball)
    return {
        "name": name,
        "version": version,
        "license": "MIT",
        "dependencies": dependencies,
        "engines": {"node": ">=18"},
        "dist": {
            "integrity": integrity,
            "shasum": shasum,
            "tarball": f"{upstream}/{name}/-/{unscoped}-{version}.tgz",
            "fileCount": 2,
            "unpackedSize": 4 * len(tarball),
        },
        "_id": f"{name}@{version}",
    }


def _pad(manifest: dict[str, Any], shape: Shape, rng: random.Random, *, pool: list[str]) -> None:
    """Grow one version's manifest to its share of the shape's sizes: devDependencies and
    optionalDependencies (kept in the abbreviated form) then description, scripts and maintainers
    (full form only)."""
    per_abbreviated = shape.abbreviated_bytes // shape.versions - 60  # its `time` entry
    per_full = shape.full_bytes // shape.versions - 60
    size = len(json.dumps(manifest))
    dev: dict[str, str] = {}
    while size < per_abbreviated:
        dep = rng.choice(pool)
        entry = f"^{rng.randint(0, 30)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}"
        if dep not in dev:
            dev[dep] = entry
            size += len(dep) + len(entry) + 6
        elif len(dev) >= len(pool) - 1:
            break
    manifest["devDependencies"] = dev
    extra = int((per_full - per_abbreviated) * 1.15)  # the padding below comes out ~15 % short
    if extra > 0:
        manifest["description"] = _words(rng, max(4, extra // 40))[: max(20, extra // 4)]
        manifest["scripts"] = {f"{rng.choice(_WORDS)}:{i}": _words(rng, 6) for i in range(max(1, extra // 200))}
        manifest["maintainers"] = [
            {"name": f"maintainer-{j}", "email": f"m{j}@example.invalid"} for j in range(max(1, extra // 160))
        ]
        manifest["gitHead"] = f"{rng.getrandbits(160):040x}"
        manifest["_npmUser"] = {"name": "bench", "email": "bench@example.invalid"}


def _document(name: str, manifests: dict[str, dict[str, Any]], latest: str, readme: str) -> dict[str, Any]:
    times = {v: f"2020-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}.000Z" for i, v in enumerate(manifests)}
    times.update({"created": "2019-01-01T00:00:00.000Z", "modified": "2024-01-01T00:00:00.000Z"})
    return {
        "_id": name,
        "name": name,
        "dist-tags": {"latest": latest},
        "versions": manifests,
        "time": times,
        "readme": readme,
        "license": "MIT",
    }


def _shaped(shape: Shape, upstream: str, rng: random.Random, latest_deps: dict[str, str], pool: list[str]) -> Package:
    manifests: dict[str, dict[str, Any]] = {}
    tarballs: dict[str, bytes] = {}
    unscoped = shape.name.rsplit("/", 1)[-1]
    latest = ""
    for i in range(shape.versions):
        version = _version(i, shape)
        tarball = _tiny_tarball(shape.name, version, rng)
        tarballs[f"{unscoped}-{version}.tgz"] = tarball
        manifest = _manifest(shape.name, version, tarball, upstream, {})
        _pad(manifest, shape, rng, pool=pool)
        manifests[version] = manifest
        if "-" not in version:
            latest = version
    manifests[latest]["dependencies"] = dict(latest_deps)
    return Package(shape.name, _document(shape.name, manifests, latest, _words(rng, 4000)), tarballs)


def _tree(label: str, scope: str, upstream: str, rng: random.Random) -> list[Package]:
    names = [f"{scope}/{label}-{i:03d}" if i % 7 == 3 else f"bench-{label}-{i:03d}" for i in range(TREE_SIZE)]
    out = []
    for i, name in enumerate(names):
        later = names[i + 1 :]
        deps = {d: "^1.0.0" for d in sorted(rng.sample(later, min(len(later), rng.randint(0, 3))))}
        count = rng.choice((2, 3, 5, 8, 12, 20, 35, 60))
        manifests: dict[str, dict[str, Any]] = {}
        tarballs: dict[str, bytes] = {}
        unscoped = name.rsplit("/", 1)[-1]
        for j in range(count):
            version = f"1.0.{j}" if j == count - 1 else f"0.{j // 10}.{j % 10}"
            payload = rng.choice((300, 1_500, 4_000, 8_000, 15_000, 40_000))
            tarball = _tiny_tarball(name, version, rng, payload)
            tarballs[f"{unscoped}-{version}.tgz"] = tarball
            manifest = _manifest(name, version, tarball, upstream, deps if j == count - 1 else {})
            manifest["description"] = f"{name}: {_words(rng, 12)}"
            manifest["devDependencies"] = {"typescript": "^5.4.0", "eslint": "^9.1.0"}
            manifest["repository"] = {"type": "git", "url": f"git+https://git.example.invalid/{unscoped}.git"}
            manifests[version] = manifest
        out.append(Package(name, _document(name, manifests, f"1.0.{count - 1}", _words(rng, 300)), tarballs))
    return out


def _roots(tree: list[Package]) -> list[str]:
    depended = {d for p in tree for d in p.document["versions"][p.latest].get("dependencies", {})}
    return [p.name for i, p in enumerate(tree) if i < 10 or p.name not in depended]


def build(root: Path, upstream_url: str) -> Corpus:
    """Generate the corpus (deterministic for a given upstream URL) and write it below `root`."""
    rng = random.Random(SEED)
    upstream = upstream_url.rstrip("/")
    tree_a = _tree("a", "@bench-a", upstream, rng)
    tree_b = _tree("b", "@bench-b", upstream, rng)
    pool = [
        f"@{rng.choice(_WORDS)}/{rng.choice(_WORDS)}-{i}" if i % 3 == 0 else f"{rng.choice(_WORDS)}-{i}"
        for i in range(400)
    ]
    packages: dict[str, Package] = {p.name: p for p in [*tree_a, *tree_b]}
    a_names = [p.name for p in tree_a]
    b_names = [p.name for p in tree_b]
    big_deps = {
        "react": {a_names[5]: "^1.0.0"},
        "typescript": {},
        "next": {a_names[3]: "^1.0.0", a_names[40]: "^1.0.0", a_names[90]: "^1.0.0"},
        "@types/node": {b_names[7]: "^1.0.0"},
    }
    for shape in (*BIG_SHAPES, MID_SHAPE):
        packages[shape.name] = _shaped(shape, upstream, rng, big_deps.get(shape.name, {}), pool)
    big_version = "1.0.0"
    big_tarball = _tiny_tarball(BIG_TARBALL_NAME, big_version, rng, ONE_MIB - 3 * 1024)
    big_manifest = _manifest(BIG_TARBALL_NAME, big_version, big_tarball, upstream, {})
    packages[BIG_TARBALL_NAME] = Package(
        BIG_TARBALL_NAME,
        _document(BIG_TARBALL_NAME, {big_version: big_manifest}, big_version, "big"),
        {f"{BIG_TARBALL_NAME}-{big_version}.tgz": big_tarball},
    )

    def pin(names: list[str]) -> dict[str, str]:
        return {n: packages[n].latest for n in names}

    one = {**pin(["next", "react"]), **{n: "^1.0.0" for n in _roots(tree_a)}}
    two = {**pin(["typescript", "@types/node"]), **{n: "^1.0.0" for n in _roots(tree_b)}}
    corpus = Corpus(
        root, upstream, packages, {"one": one, "two": two, "all": {**one, **two}}, {"a": a_names, "b": b_names}
    )
    _write(corpus)
    return corpus


def _write(corpus: Corpus) -> None:
    from batlehub_npm.documents import abbreviate  # the hub's own abbreviation, for the sizes table

    docs = corpus.root / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for package in corpus.packages.values():
        body = json.dumps(package.document, separators=(",", ":")).encode()
        (docs / f"{package.url_name}.json").write_bytes(body)
        folder = corpus.root / "tarballs" / package.name / "-"
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, data in package.tarballs.items():
            (folder / file_name).write_bytes(data)
        if len(package.document["versions"]) >= 100:
            abbreviated = json.dumps(abbreviate(package.document), separators=(",", ":")).encode()
            corpus.sizes[package.name] = {
                "versions": len(package.document["versions"]),
                "full": len(body),
                "abbreviated": len(abbreviated),
            }


UPSTREAM_SCRIPT = r"""
import collections, json, sys, urllib.parse
from pathlib import Path
from aiohttp import web

root = Path(sys.argv[1])
counts = collections.Counter()

async def handle(request):
    path = urllib.parse.unquote(request.raw_path.split("?", 1)[0])
    if path == "/-/bench/stats":
        return web.json_response(counts)
    counts[f"{request.method} {path}"] += 1
    if "/-/" in path:
        file = root / "tarballs" / path.lstrip("/")
        kind = "application/octet-stream"
    else:
        file = root / "docs" / (path.lstrip("/").replace("/", "%2f") + ".json")
        kind = "application/json"
    if ".." in path or not file.is_file():
        return web.json_response({"error": "not found"}, status=404)
    return web.FileResponse(file, headers={"Content-Type": kind})

app = web.Application()
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None,
            print=lambda *_: print("ready", flush=True))
"""
