"""The PyPI JSON API (`/pypi/<project>/json`, `/pypi/<project>/<version>/json`) beside the PEP 691
project page, for a project with 500 files, proxied and local.

    .venv/bin/python bench/pypi_json_api.py [--duration 5] [--connections 10] [--hub-env KEY=VALUE]

Starts a small upstream index (one PEP 691 JSON page: 100 releases of `bench-many-files`, five
wheels each, with digests, `core-metadata`, `size` and `upload-time`; nothing is downloaded), a hub
(`BenchHub`: SQLite, memory cache, filesystem storage) with a `proxy` registry in front of it and a
`local` one holding 500 uploaded releases (one wheel each), then runs wrk (one thread, after a
warm-up run of the same length) on the project page and the two JSON API documents of each. To
measure older code, put its packages on the hub's `PYTHONPATH` (`--hub-env PYTHONPATH=DIR`, see
README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.load import run_wrk
from benchkit.servers import ADMIN_TOKEN, REPO, BenchHub, HubRegistry, require_program

sys.path.insert(0, str(REPO / "plugins" / "pypi" / "tests"))

try:
    from pypi_testdata import basic, upload_form, wheel_bytes

    from batlehub.testing.services import LOOPBACK, free_port, wait_until
except ImportError as exc:  # pragma: no cover - the venv lacks the project
    raise SystemExit(f"bench: {exc}; run `.venv/bin/pip install -e . -e 'plugins/pypi[test]'`") from exc

PROJECT = "bench-many-files"
RELEASES = 100
TAGS = (
    "py3-none-any",
    "cp311-cp311-manylinux_2_17_x86_64",
    "cp312-cp312-manylinux_2_17_x86_64",
    "cp313-cp313-manylinux_2_17_x86_64",
    "cp312-cp312-win_amd64",
)
LOCAL_RELEASES = 500
UPLOADERS = 4
HEADERS = {"Accept": "application/vnd.pypi.simple.v1+json", "Accept-Encoding": "gzip, deflate"}
UPSTREAM = r"""
import sys
from aiohttp import web

page = open(sys.argv[2], "rb").read()


async def simple(request):
    return web.Response(body=page, content_type="application/vnd.pypi.simple.v1+json")


app = web.Application()
app.router.add_get("/simple/{project}/", simple)
web.run_app(app, host=sys.argv[3], port=int(sys.argv[1]), print=None)
"""


def upstream_page() -> bytes:
    files = []
    for i in range(RELEASES):
        for tag in TAGS:
            name = f"bench_many_files-1.{i}.0-{tag}.whl"
            digest = hashlib.sha256(name.encode()).hexdigest()
            files.append(
                {
                    "filename": name,
                    "url": f"../../files/{name}",
                    "hashes": {"sha256": digest},
                    "core-metadata": {"sha256": digest},
                    "requires-python": ">=3.9",
                    "size": 12345 + i,
                    "upload-time": f"2024-01-{1 + i % 28:02d}T12:00:00.000000Z",
                }
            )
    versions = [f"1.{i}.0" for i in range(RELEASES)]
    return json.dumps({"meta": {"api-version": "1.1"}, "name": PROJECT, "versions": versions, "files": files}).encode()


async def upload_local(url: str) -> None:
    wheels = [wheel_bytes(PROJECT, f"1.{i}.0") for i in range(LOCAL_RELEASES)]
    gate = asyncio.Semaphore(UPLOADERS)
    async with aiohttp.ClientSession() as session:

        async def one(i: int, filename: str, data: bytes) -> None:
            async with gate:
                form = upload_form(PROJECT, f"1.{i}.0", filename, data)
                async with session.post(url + "legacy/", data=form, headers=basic(ADMIN_TOKEN)) as response:
                    if response.status != 200:
                        raise SystemExit(f"upload of {filename} failed: {response.status} {await response.text()}")

        await asyncio.gather(*(one(i, f, d) for i, (f, d) in enumerate(wheels)))


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--connections", type=int, default=10, help="wrk connections (default 10)")
    parser.add_argument("--hub-env", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    args = parser.parse_args()
    wrk = require_program("wrk", "wrk")
    env = dict(item.split("=", 1) for item in args.hub_env)
    scratch = Path(tempfile.mkdtemp(prefix="batlehub-bench-pypi-json-"))
    (scratch / "page.json").write_bytes(upstream_page())
    port = free_port()
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(port), str(scratch / "page.json"), LOOPBACK])
    index = f"http://{LOOPBACK}:{port}/simple/"
    registries = [HubRegistry("proxy", "proxy", (index,), type="pypi"), HubRegistry("local", "local", type="pypi")]
    hub = BenchHub(scratch / "hub", registries, env=env or None)
    try:
        wait_until(lambda: answers(index + f"{PROJECT}/"), what="the upstream index", timeout=30)
        hub.start()
        proxy, local = hub.registry_url("proxy"), hub.registry_url("local")
        started = time.perf_counter()
        asyncio.run(upload_local(local))
        print(f"{LOCAL_RELEASES} uploads to hub-local: {time.perf_counter() - started:.1f} s", flush=True)
        urls = {
            "proxy: simple JSON page": proxy + f"simple/{PROJECT}/",
            "proxy: JSON API project": proxy + f"pypi/{PROJECT}/json",
            "proxy: JSON API release": proxy + f"pypi/{PROJECT}/1.50.0/json",
            "local: simple JSON page": local + f"simple/{PROJECT}/",
            "local: JSON API project": local + f"pypi/{PROJECT}/json",
            "local: JSON API release": local + f"pypi/{PROJECT}/1.250.0/json",
        }
        for what, url in urls.items():
            request = urllib.request.Request(url, headers={"Accept": HEADERS["Accept"]})
            with urllib.request.urlopen(request, timeout=60) as response:
                print(f"{what}: {len(response.read())} bytes", flush=True)
        for what, url in urls.items():
            for _ in range(2):  # warm-up, then the measured run
                result = run_wrk(
                    wrk,
                    url,
                    connections=args.connections,
                    duration=args.duration,
                    headers=HEADERS,
                    pids=hub.server_pids,
                )
            print(
                f"{what:24s} {result.rps:8.0f} req/s  p50 {result.p50_ms:.1f} ms  p99 {result.p99_ms:.1f} ms"
                f"  errors {result.errors}",
                flush=True,
            )
    finally:
        hub.stop()
        upstream.terminate()
        upstream.wait()


if __name__ == "__main__":
    main()
