"""What an operator watching a hub sees: `GET /metrics` after a known sequence of requests (exact
values, from one process and added up over two workers), who may read it, traces a real OTLP
receiver gets (with the upstream seeing the same trace id), and JSON log lines.

Every hub is a real `batlehub serve`; the upstream is a small npm registry served by the test, so
that it can fail on purpose and show the `traceparent` headers it received.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from batlehub.testing.hub import Hub, HubFactory, token_auth_toml
from batlehub.testing.otlp import OtlpReceiver
from batlehub.testing.services import LOOPBACK, free_port

ADMIN = "admin-token-0001"
ALICE = "alice-token-0001"
SCRAPER = "scraper-token-01"
TOKENS = token_auth_toml({"admin": (ADMIN, "admin"), "alice": (ALICE, "user"), "prometheus": (SCRAPER, "metrics")})
ABBREVIATED = {"Accept": "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"}
TARBALL = b"not really a tarball, but the bytes its digests announce" * 20


class Upstream:
    """A tiny npm registry: `left-pad` (and any name in `extra`) exist, `broken` answers 500,
    everything else 404. Keeps the `traceparent` of every request it got."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}/"
        self.traceparents: list[str | None] = []
        self.paths: list[str] = []
        self._runner: web.AppRunner | None = None

    def packument(self, name: str) -> dict[str, Any]:
        tarball = f"{self.url}{name}/-/{name}-1.0.0.tgz"
        integrity = "sha512-" + base64.b64encode(hashlib.sha512(TARBALL).digest()).decode()
        return {
            "name": name,
            "dist-tags": {"latest": "1.0.0"},
            "versions": {
                "1.0.0": {
                    "name": name,
                    "version": "1.0.0",
                    "dist": {"tarball": tarball, "shasum": hashlib.sha1(TARBALL).hexdigest(), "integrity": integrity},
                }
            },
            "time": {"1.0.0": "2020-01-01T00:00:00.000Z"},
        }

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.traceparents.append(request.headers.get("traceparent"))
        self.paths.append(request.path)
        parts = request.path.strip("/").split("/")
        if parts[0] == "broken":
            return web.json_response({"error": "on fire"}, status=500)
        if not parts[0].startswith(("left-pad", "traced")):
            return web.json_response({"error": "not found"}, status=404)
        if len(parts) == 1:
            return web.json_response(self.packument(parts[0]))
        return web.Response(body=TARBALL, content_type="application/octet-stream")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, LOOPBACK, self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.stop()


def hub_config(upstream: Upstream, extra: str = "") -> str:
    return f"""{TOKENS}
[[registries]]
type = "npm"
name = "npm"
mode = "proxy"
upstreams = ["{upstream.url}"]

[[registries]]
type = "npm"
name = "local"
mode = "local"
[registries.quota]
max_versions_per_user = 1

[[registries]]
type = "npm"
name = "limited"
mode = "local"
[registries.rate_limit]
requests_per_window = 2
window_secs = 600
{extra}"""


def publish_body(name: str, version: str) -> bytes:
    filename = f"{name}-{version}.tgz"
    manifest = {"name": name, "version": version, "dist": {"tarball": f"http://x/{name}/-/{filename}"}}
    return json.dumps(
        {
            "_id": name,
            "name": name,
            "dist-tags": {"latest": version},
            "versions": {version: manifest},
            "_attachments": {
                filename: {
                    "content_type": "application/octet-stream",
                    "data": base64.b64encode(TARBALL).decode(),
                    "length": len(TARBALL),
                }
            },
        }
    ).encode()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> int:
    async with session.request(method, url, **kwargs) as response:
        await response.read()
        return response.status


class Scrape:
    """A parsed `/metrics` answer."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels`."""
        return sum(
            s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


async def scrape(url: str, token: str | None = SCRAPER) -> Scrape:
    # A new connection each time: with several workers, any of them may answer.
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.get(url, headers=bearer(token) if token else {}) as response,
    ):
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        return Scrape(await response.text())


async def known_sequence(hub: Hub) -> None:
    """Hits, misses, an upstream failure, a remembered 404, a publish, a refused publish (over
    quota), and a rate-limited request. The expected counts are spelled out in the test."""
    npm, local, limited = (f"{hub.url}/registries/{name}" for name in ("npm", "local", "limited"))
    async with aiohttp.ClientSession() as session:
        assert await call(session, "GET", f"{npm}/left-pad", headers=ABBREVIATED) == 200  # document miss
        assert await call(session, "GET", f"{npm}/left-pad", headers=ABBREVIATED) == 200  # document hit
        tarball = f"{npm}/left-pad/-/left-pad-1.0.0.tgz"
        assert await call(session, "GET", tarball) == 200  # document hit, artifact miss (downloaded)
        assert await call(session, "GET", tarball) == 200  # document hit, artifact hit
        assert await call(session, "HEAD", tarball) == 200  # document hit, artifact hit; no body bytes
        assert await call(session, "GET", f"{npm}/broken") == 502  # document miss, upstream 500
        assert await call(session, "GET", f"{npm}/nothere") == 404  # document miss, upstream 404
        assert await call(session, "GET", f"{npm}/nothere") == 404  # remembered: absent, no upstream request
        put = {**bearer(ALICE), "Content-Type": "application/json"}
        assert await call(session, "PUT", f"{local}/mine", data=publish_body("mine", "1.0.0"), headers=put) == 201
        assert await call(session, "PUT", f"{local}/second", data=publish_body("second", "1.0.0"), headers=put) == 403
        for expected in (200, 200, 429):
            assert await call(session, "GET", f"{limited}/-/ping") == expected


async def test_metrics_after_a_known_sequence_are_exact(hub: HubFactory, upstream: Upstream) -> None:
    server = await hub(hub_config(upstream))
    await known_sequence(server)
    got = await scrape(server.url + "/metrics")
    v = got.value

    def requests(**labels: str) -> float:
        return v("batlehub_http_requests_total", **labels)

    # Requests by registry, route (the npm format names them), method and status.
    assert requests(registry="npm", format="npm", route="package", method="GET", status="200") == 2
    assert requests(registry="npm", route="package", status="502") == 1
    assert requests(registry="npm", route="package", status="404") == 2
    assert requests(registry="npm", route="tarball", method="GET", status="200") == 2
    assert requests(registry="npm", route="tarball", method="HEAD", status="200") == 1
    assert requests(registry="local", route="package", method="PUT", status="201") == 1
    assert requests(registry="local", route="package", method="PUT", status="403") == 1
    assert requests(registry="limited", route="ping", status="200") == 2
    # Refused before the format saw it (rate limit, IP block, a bad token): the route is not known.
    assert requests(registry="limited", route="other", status="429") == 1
    assert v("batlehub_http_request_duration_seconds_count", registry="npm", route="package") == 5
    # Two 1,120-byte tarballs went out; the HEAD sent none.
    assert v("batlehub_http_response_bytes_total", registry="npm", route="tarball") == 2 * len(TARBALL)

    # The caches of upstream content.
    documents = "batlehub_document_cache_lookups_total"
    assert v(documents, registry="npm", format="npm", result="miss") == 3
    assert v(documents, registry="npm", result="hit") == 4
    assert v(documents, registry="npm", result="absent") == 1
    assert v(documents, registry="npm", result="stale") == 0
    assert v("batlehub_artifact_cache_lookups_total", registry="npm", result="miss") == 1
    assert v("batlehub_artifact_cache_lookups_total", registry="npm", result="hit") == 2

    # The upstream, by origin (never a full URL): packuments of left-pad, broken, nothere, a tarball.
    origin = upstream.url.rstrip("/")
    assert upstream.paths == ["/left-pad", "/left-pad/-/left-pad-1.0.0.tgz", "/broken", "/nothere"]
    assert v("batlehub_upstream_requests_total", registry="npm", origin=origin, status="200") == 2
    assert v("batlehub_upstream_requests_total", registry="npm", origin=origin, status="500") == 1
    assert v("batlehub_upstream_requests_total", registry="npm", origin=origin, status="404") == 1
    assert v("batlehub_upstream_errors_total", registry="npm", origin=origin) == 1
    assert v("batlehub_upstream_errors_total", registry="npm", origin=origin, reason="status") == 1
    assert v("batlehub_upstream_request_duration_seconds_count", registry="npm", origin=origin) == 4

    # Writes and decisions.
    assert v("batlehub_publishes_total", registry="local", format="npm", result="published") == 1
    assert v("batlehub_publishes_total", registry="local", result="refused") == 1
    assert v("batlehub_published_bytes_total", registry="local") == len(TARBALL)
    assert v("batlehub_quota_exceeded_total", registry="local", action="refused") == 1
    assert v("batlehub_rate_limit_decisions_total", registry="limited", decision="allowed") == 2
    assert v("batlehub_rate_limit_decisions_total", registry="limited", decision="limited") == 1

    # Backends and the process.
    assert v("batlehub_database_operation_duration_seconds_count") > 0
    assert v("batlehub_database_errors_total") == 0
    # A download, a publish, and the refused publish (its blob is stored before the quota refuses it).
    assert v("batlehub_storage_operation_duration_seconds_count", operation="put") == 3
    assert v("batlehub_storage_errors_total") == 0
    assert v("batlehub_event_loop_lag_seconds_count") > 0
    assert "batlehub_event_loop_lag_worst_seconds" in got.names()
    assert v("batlehub_build_info") == 1

    # Bounded labels: no package name, no client address, no token anywhere in the scrape.
    for secret_or_unbounded in ("left-pad", "nothere", "mine", ADMIN, ALICE, SCRAPER):
        assert secret_or_unbounded not in got.text


async def test_backend_health_is_exported(hub: HubFactory, upstream: Upstream) -> None:
    server = await hub(hub_config(upstream))
    async with aiohttp.ClientSession() as session:
        assert await call(session, "GET", server.url + "/api/v1/admin/health") == 200
    got = await scrape(server.url + "/metrics")
    for backend in ("database", "storage", "cache"):
        assert got.value("batlehub_backend_up", backend=backend) == 1


async def test_metrics_need_an_admin_or_metrics_token(hub: HubFactory, upstream: Upstream) -> None:
    server = await hub(hub_config(upstream))
    url = server.url + "/metrics"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 401
            assert "WWW-Authenticate" in response.headers
        assert await call(session, "GET", url, headers=bearer(ALICE)) == 403
        assert await call(session, "GET", url, headers=bearer("wrong-token-0001")) == 401
        assert await call(session, "GET", url, headers=bearer(ADMIN)) == 200
        assert await call(session, "GET", url, headers=bearer(SCRAPER)) == 200
        # A scraper's token reads registries like no token at all (here: anonymous may read).
        assert await call(session, "GET", server.url + "/registries/local/-/ping", headers=bearer(SCRAPER)) == 200
        # An admin can make a metrics token through the API as well.
        async with session.post(
            server.url + "/api/v1/admin/tokens", json={"user_id": "scraper2", "role": "metrics"}, headers=bearer(ADMIN)
        ) as response:
            assert response.status in (200, 201), await response.text()
            made = (await response.json())["token"]
        assert await call(session, "GET", url, headers=bearer(made)) == 200


async def test_metrics_open_on_their_own_port_or_off(hub: HubFactory, upstream: Upstream) -> None:
    opened = await hub(hub_config(upstream, "[metrics]\nrequire_token = false\n"))
    assert (await scrape(opened.url + "/metrics", token=None)).value("batlehub_build_info") == 1

    port = free_port()
    separate = await hub(hub_config(upstream, f"[metrics]\nport = {port}\n"))
    got = await scrape(f"http://{LOOPBACK}:{port}/metrics", token=None)
    assert got.value("batlehub_build_info") == 1
    off = await hub(hub_config(upstream, "[metrics]\nenabled = false\n"))
    async with aiohttp.ClientSession() as session:
        assert await call(session, "GET", separate.url + "/metrics", headers=bearer(ADMIN)) == 404
        assert await call(session, "GET", off.url + "/metrics", headers=bearer(ADMIN)) == 404


async def test_two_workers_add_up(hub: HubFactory, upstream: Upstream, tmp_path: Path) -> None:
    """With `server.workers = 2`, whichever worker answers a scrape reports both workers' counts."""
    from prometheus_client.multiprocess import MultiProcessCollector

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    server = await hub(hub_config(upstream, "[server]\nworkers = 2\n"), env={"TMPDIR": str(tmp)})
    [folder] = list(tmp.glob("batlehub-metrics-*"))

    def per_worker() -> list[float]:
        """Banner requests in each worker's own file: the scrape must add them up."""
        counts = []
        for path in sorted(folder.glob("counter_*.db")):
            samples = [s for m in MultiProcessCollector.merge([str(path)]) for s in m.samples]
            banner = [s for s in samples if s.name == "batlehub_http_requests_total" and "banner" in s.labels["route"]]
            counts.append(sum(s.value for s in banner))
        return counts

    total = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        # New connections, so the kernel spreads them over both workers (the second may still be
        # starting when the first answers health: go on until both have served some).
        for _ in range(50):
            for _ in range(20):
                assert await call(session, "GET", server.url + "/api/v1/banner") == 200
                total += 1
            if len([n for n in per_worker() if n > 0]) == 2:
                break
    # Each worker hands its counts to its file on its loop-watch tick (50 ms).
    for _ in range(40):
        counts = per_worker()
        if sum(counts) == total:
            break
        await asyncio.sleep(0.05)
    assert len(counts) == 2 and all(n > 0 for n in counts) and sum(counts) == total, counts
    for _ in range(6):
        got = await scrape(server.url + "/metrics")
        assert got.value("batlehub_http_requests_total", route="/api/v1/banner") == total
        assert got.value("batlehub_build_info") == 1  # one series, not one per worker
    await server.stop()
    assert not folder.exists()  # the parent removes the workers' files when it stops


async def test_a_cache_miss_is_one_trace_that_the_upstream_continues(hub: HubFactory, upstream: Upstream) -> None:
    with OtlpReceiver() as receiver:
        server = await hub(
            hub_config(upstream, f'[otel]\nendpoint = "{receiver.endpoint}"\nservice_name = "hub-under-test"\n'),
            env={"OTEL_BSP_SCHEDULE_DELAY": "100"},
        )
        async with aiohttp.ClientSession() as session:
            assert await call(session, "GET", f"{server.url}/registries/npm/traced-a", headers=ABBREVIATED) == 200
        [sent] = upstream.traceparents
        assert sent is not None
        _, trace_id, upstream_parent, _ = sent.split("-")

        def complete(spans: list[Any]) -> bool:
            return any(s.trace_id == trace_id and s.kind == 2 for s in spans)  # the server span

        spans = [s for s in receiver.wait_for(complete) if s.trace_id == trace_id]
        [request_span] = [s for s in spans if s.kind == 2]
        assert request_span.name == "GET package" and request_span.parent_span_id == ""
        assert request_span.attributes["http.response.status_code"] == 200
        assert request_span.attributes["url.path"] == "/registries/npm/traced-a"
        assert request_span.resource["service.name"] == "hub-under-test"
        assert request_span.resource["service.version"]
        assert request_span.resource["service.instance.id"]
        [upstream_span] = [s for s in spans if s.kind == 3 and s.name.startswith("GET http://")]
        assert upstream_span.span_id == upstream_parent  # the upstream's parent is the hub's client span
        assert upstream_span.attributes["url.full"] == f"{upstream.url}traced-a"
        names = {s.name for s in spans}
        assert {"cache get", "cache set"} <= names  # the cache, and the durable copy's database write
        assert any(name.startswith("db ") for name in names)
        by_id = {s.span_id: s for s in spans}
        for span in spans:  # one tree: every span leads up to the request's
            while span.parent_span_id:
                span = by_id[span.parent_span_id]
            assert span is request_span

        # A client that sends its own traceparent gets its trace continued, upstream included.
        client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        headers = {**ABBREVIATED, "traceparent": f"00-{client_trace}-{client_span}-01"}
        async with aiohttp.ClientSession() as session:
            assert await call(session, "GET", f"{server.url}/registries/npm/traced-b", headers=headers) == 200
        assert upstream.traceparents[-1] is not None and client_trace in upstream.traceparents[-1]
        spans = receiver.wait_for(lambda spans: any(s.trace_id == client_trace and s.kind == 2 for s in spans))
        [continued] = [s for s in spans if s.trace_id == client_trace and s.kind == 2]
        assert continued.parent_span_id == client_span


async def test_without_an_endpoint_nothing_is_traced_or_propagated(hub: HubFactory, upstream: Upstream) -> None:
    server = await hub(hub_config(upstream))
    headers = {**ABBREVIATED, "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    async with aiohttp.ClientSession() as session:
        assert await call(session, "GET", f"{server.url}/registries/npm/left-pad", headers=headers) == 200
    assert upstream.traceparents == [None]


async def test_json_log_lines(hub: HubFactory, upstream: Upstream) -> None:
    with OtlpReceiver() as receiver:
        server = await hub(
            hub_config(upstream, f'[otel]\nendpoint = "{receiver.endpoint}"\n'),
            env={"BATLEHUB_LOG_FORMAT": "json", "OTEL_BSP_SCHEDULE_DELAY": "100"},
        )
        async with aiohttp.ClientSession() as session:
            assert await call(session, "GET", f"{server.url}/registries/npm/left-pad", headers=bearer(ALICE)) == 200
            await asyncio.sleep(0.2)
        await server.stop()
    written = [line for line in server.logs().splitlines() if line.strip() and not line.startswith("=== ")]
    lines = [json.loads(line) for line in written]  # every line the server wrote is one JSON object
    [access] = [line for line in lines if line["logger"] == "batlehub.access" and line["path"].endswith("left-pad")]
    assert access["method"] == "GET" and access["status"] == 200 and access["user"] == "alice"
    assert access["ip"] == LOOPBACK and isinstance(access["duration_ms"], float)
    assert re.fullmatch(r"[0-9a-f]{32}", access["trace_id"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4}", access["time"])
    assert any(line["logger"] == "batlehub.server" and "listening" in line["message"] for line in lines)
    assert ALICE not in server.logs()
