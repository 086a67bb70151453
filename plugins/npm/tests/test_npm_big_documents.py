"""Real-world document sizes: a 20 MB packument (like the biggest ones on public registries) is
decoded, rendered and compressed away from the event loop, once per content, so eight clients
asking for it at once do not stall anyone else: a cached small document and the health check stay
fast meanwhile. A regression test, on a real `batlehub serve` behind a real socket; the upstream,
the eight clients and the probe each run in their own process, so that only the hub is measured."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from batlehub.testing.hub import Hub, HubFactory

BIG_VERSIONS = 2000
STALL_BUDGET_MS = 50.0
"""Decoding and rendering the big document on the event loop stalls everyone for about 400 ms on a
2-core machine (and more for bigger documents); off it, the probe's p99 delay is about 35-45 ms
here, mostly CPU contention of ten processes on two cores, not the hub's event loop."""

UPSTREAM = """
import sys
from pathlib import Path
from aiohttp import web

async def handle(request):
    path = Path(sys.argv[1]) / (request.match_info["name"] + ".json")
    if not path.is_file():
        return web.json_response({"error": "not found"}, status=404)
    return web.FileResponse(path, headers={"Content-Type": "application/json"})

app = web.Application()
app.router.add_get("/{name}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=lambda *_: print("ready", flush=True))
"""

PROBE = """
import asyncio, json, sys, threading, time
import aiohttp

stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

async def timed(session, url):
    started = time.perf_counter()
    async with session.get(url) as response:
        await response.read()
        assert response.status == 200, (url, response.status)
    return (time.perf_counter() - started) * 1000

async def main(hub):
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            await timed(session, hub + "/registries/npm/small")
        baseline = [await timed(session, hub + "/registries/npm/small") for _ in range(40)]
        print("ready", flush=True)
        during = []
        while not stop.is_set():  # until the test closes our stdin
            during.append(await timed(session, hub + "/registries/npm/small"))
            during.append(await timed(session, hub + "/api/v1/admin/health"))
            await asyncio.sleep(0.01)
    print(json.dumps({"baseline": baseline, "during": during}))

asyncio.run(main(sys.argv[1]))
"""


def packument(name: str, versions: int, padding: int) -> dict[str, Any]:
    manifests = {}
    for i in range(versions):
        version = f"1.{i // 100}.{i % 100}"
        manifests[version] = {
            "name": name,
            "version": version,
            "description": "x" * padding,
            "dependencies": {f"dep-{j}": f"^{j}.0.0" for j in range(20)},
            "scripts": {"test": "node test.js", "build": "tsc -p ."},
            "dist": {
                "tarball": f"http://upstream.invalid/{name}/-/{name}-{version}.tgz",
                "shasum": "0" * 40,
                "integrity": "sha512-" + "A" * 86 + "==",
            },
        }
    latest = list(manifests)[-1]
    return {"name": name, "dist-tags": {"latest": latest}, "versions": manifests, "readme": "r" * 100_000}


async def python(script: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )


@pytest.fixture
async def upstream(tmp_path: Path, unused_tcp_port: int) -> AsyncIterator[str]:
    documents = tmp_path / "upstream"
    documents.mkdir()
    (documents / "big.json").write_text(json.dumps(packument("big", BIG_VERSIONS, 9500)))
    (documents / "small.json").write_text(json.dumps(packument("small", 3, 10)))
    assert (documents / "big.json").stat().st_size > 20_000_000
    server = await python(UPSTREAM, str(documents), str(unused_tcp_port))
    assert server.stdout is not None
    assert await asyncio.wait_for(server.stdout.readline(), 30) == b"ready\n"
    yield f"http://127.0.0.1:{unused_tcp_port}/"
    server.terminate()
    await server.wait()


async def big_download(hub: Hub, accept: str) -> int:
    """One client fetching the big document (curl, which asks for gzip like npm does). Clients run on
    other machines in real life: here they run niced, so that their CPU use does not starve the
    hub's process and get counted as the hub's stall."""
    process = await asyncio.create_subprocess_exec(
        "nice",
        "-n",
        "10",
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        f"Accept: {accept}",
        "--compressed",
        f"{hub.url}/registries/npm/big",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    return int(out or 0)


async def stall(hub: HubFactory, upstream: str) -> float:
    """On a fresh hub: p99 delay (ms) of the probe over its baseline while 8 clients fetch the big
    document cold (one upstream fetch, one decode and one render per variant for all eight at once)
    and then 8 more fetch it warm (the rendered bytes, from memory or spilled to disk)."""
    config = f'[[registries]]\ntype = "npm"\nname = "npm"\nmode = "proxy"\nupstreams = ["{upstream}"]\n'
    server: Hub = await hub(config)
    probe = await python(PROBE, server.url)
    assert probe.stdout is not None
    assert await asyncio.wait_for(probe.stdout.readline(), 30) == b"ready\n"

    accepts = ["application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*", "application/json"]
    statuses = []
    for _ in ("cold", "warm"):
        statuses += await asyncio.gather(*(big_download(server, accepts[i % 2]) for i in range(8)))
    out, _ = await asyncio.wait_for(probe.communicate(b""), 60)
    result = json.loads(out)
    await server.stop()

    assert statuses == [200] * 16
    during, baseline = result["during"], result["baseline"]
    p99 = statistics.quantiles(during, n=100)[98]
    delay = p99 - statistics.median(baseline)
    print(
        f"\nsmall document + health while 8 clients fetch 20 MB: p99 {p99:.1f} ms over {len(during)} probes;"
        f" baseline median {statistics.median(baseline):.1f} ms; delay {delay:.1f} ms;"
        f" slowest {[round(x) for x in sorted(during)[-5:]]}"
    )
    return delay


@pytest.mark.slow
async def test_eight_clients_of_a_20mb_document_do_not_stall_anyone_else(hub: HubFactory, upstream: str) -> None:
    # Another measurement on a fresh hub only while the last is over budget (three at most): a hub
    # that does the work on its event loop is over it every time (about 400 ms), while a shared
    # 2-core machine can be busy elsewhere for a run (seen at 50-62 ms with a load average of 8).
    delays = [await stall(hub, upstream)]
    while delays[-1] > STALL_BUDGET_MS and len(delays) < 3:
        delays.append(await stall(hub, upstream))
    assert min(delays) <= STALL_BUDGET_MS, delays
