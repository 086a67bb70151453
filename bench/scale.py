"""Real-world scale (issue 14): big documents never stall the hub; memory and disk stay within
budgets; the Redis cache keeps up with the memory cache; and the raised load targets, side by side
with Verdaccio, nginx and a bare aiohttp handler, in one run.

    .venv/bin/python bench/run.py --suite scale [--quick] [--out FILE] [--markdown FILE]

Every server runs on a free loopback port in a scratch folder. The data is `benchkit.corpus`
(generated from a fixed seed, offline) served by a small static upstream; see bench/README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import BenchError, corpus, packages
from benchkit.load import NPM_ABBREVIATED_ACCEPT, NPM_HEADERS, LoadResult, RssSampler, run_wrk
from benchkit.report import Target
from benchkit.servers import (
    ADMIN_TOKEN,
    REPO,
    BenchHub,
    HubRegistry,
    free_port,
    http_get,
    require_program,
    rss_bytes,
    start_static_nginx,
    start_verdaccio,
)
from benchkit.session import BenchSession

from batlehub.retention import DELETE_GRACE_SECS

MIB = 1024 * 1024
USER_TOKEN = "bench-user-token-0123456789abcdef"
SECURED = """[registries.rbac]
anonymous = []
user = ["releases:read", "source:read"]
admin = ["*"]
[registries.rate_limit]
requests_per_window = 1000000000
window_secs = 60
"""
"""The `secured` registry: reads need a token (RBAC), and every request is counted against a rate
limit (one high enough never to refuse, so every request pays for the counter)."""
USER_TOKEN_TOML = f'[[auth.tokens]]\nvalue = "{USER_TOKEN}"\nrole = "user"\nuser_id = "bench-user"\n'
STALL_BUDGET_MS = 50.0
SMALL_DOC = "bench-a-000"
MID = corpus.MID_SHAPE.name
BIG = "next"
FULL_ACCEPT = "application/json"

PROBE = r"""
import asyncio, json, sys, threading, time
import aiohttp

stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

async def timed(session, url):
    started = time.perf_counter()
    async with session.get(url, headers={"Accept-Encoding": "gzip"}) as response:
        await response.read()
        assert response.status == 200, (url, response.status)
    return (time.perf_counter() - started) * 1000

async def main(urls):
    async with aiohttp.ClientSession() as session:
        for url in urls * 3:
            await timed(session, url)
        baseline = []
        for _ in range(25):
            for url in urls:
                baseline.append(await timed(session, url))
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        during = []
        while not stop.is_set():
            for url in urls:
                during.append(await timed(session, url))
            await asyncio.sleep(0.01)
    print(json.dumps({"baseline": baseline, "during": during}))

asyncio.run(main(sys.argv[1:]))
"""
"""Asks for a cached small document and the health check in turn, in its own process: its
baseline first, then until its stdin closes (the same method as the npm plugin's stall test)."""

BARE = r"""
import json, sys
from pathlib import Path
from aiohttp import web

body = Path(sys.argv[1]).read_bytes()
headers = json.loads(Path(sys.argv[2]).read_text())

async def handle(request):
    return web.Response(body=body, headers=headers)

app = web.Application()
app.router.add_get("/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[3]), access_log=None,
            print=lambda *_: print("ready", flush=True))
"""
"""The ceiling of our own stack: aiohttp answering every GET with the hub's prepared bytes and
headers, no middleware, no access log."""

BARE_DUTIES = r"""
import json, sys, time
from pathlib import Path
from aiohttp import web
from batlehub.accesslog import StreamAccessLog
from batlehub.metrics import HubMetrics
from batlehub.net import client_ip

body = Path(sys.argv[1]).read_bytes()
headers = json.loads(Path(sys.argv[2]).read_text())
access = StreamAccessLog(open(sys.argv[4], "a"))
observed = HubMetrics()

@web.middleware
async def duties(request, handler):
    ip = client_ip(request.remote, request.headers, ())
    started = time.perf_counter()
    response = await handler(request)
    elapsed = time.perf_counter() - started
    observed.request_series("proxy", "npm", "packument", request.method, response.status).record(
        elapsed, response.content_length
    )
    access.write(request.method, request.rel_url.raw_path, response.status, elapsed * 1000, None, ip)
    return response

async def handle(request):
    return web.Response(body=body, headers=headers)

app = web.Application(middlewares=[duties])
app.router.add_get("/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[3]), access_log=None,
            print=lambda *_: print("ready", flush=True))
"""
"""The same, plus only what the hub must do for every request whatever it serves: find the client
IP, write one access line (the hub's own writer, to a file), count the request in the metrics."""


class Child:
    """A Python helper process (the upstream, the bare handler) that prints "ready" when it listens."""

    def __init__(self, script: str, args: list[str], log: Path) -> None:
        self.argv = [sys.executable, "-c", script, *args]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self.log.open("ab"))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise BenchError(f"{self.argv[3:]} did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def _decoded(body: bytes) -> bytes:
    import gzip

    return gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body


def _post_json(url: str, data: dict[str, Any], token: str = ADMIN_TOKEN) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(data).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _du(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


class Scale(BenchSession):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(prefix="batlehub-scale-", keep=args.keep)
        self.quick: bool = args.quick
        self.duration: float = args.duration or (2.0 if self.quick else 5.0)
        self.hub_toml: str = "\n".join(args.hub_toml or []).replace("\\n", "\n")
        self.hub_env: dict[str, str] = dict(item.split("=", 1) for item in args.hub_env or [])
        self.only: set[str] = set(args.scenario or ["stall", "rss", "retention", "redis", "raised"])
        self.results: dict[str, Any] = {"errors": {}}
        self.load_at_start = os.getloadavg()

    # --- orchestration ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            self.setup()
            for name in ("stall", "rss", "retention", "redis", "raised"):
                if name not in self.only:
                    continue
                try:
                    getattr(self, name)()
                except Exception as exc:
                    # One broken scenario is reported, the others still run.
                    self.results["errors"][name] = str(exc)[-3000:]
                    self.say(f"scenario {name} FAILED: {str(exc)[-1500:]}")
        finally:
            self.close()
        self.results["meta"] = self._meta()
        return self.results

    def setup(self) -> None:
        self.say(f"scratch folder {self.scratch}; {os.cpu_count()} CPUs; {'quick' if self.quick else 'full'} run")
        self.wrk = require_program("wrk", "wrk")
        self.upstream_port = free_port()
        started = time.monotonic()
        self.corpus = corpus.build(self.scratch / "corpus", f"http://127.0.0.1:{self.upstream_port}")
        self.results["corpus"] = {
            "seconds": round(time.monotonic() - started, 1),
            "packages": len(self.corpus.packages),
            "documents": self.corpus.sizes,
            "projects": {p: self.corpus.expected_installed(p) for p in self.corpus.projects},
            "project_upstream_bytes": {p: self.corpus.bytes_of(p) for p in self.corpus.projects},
        }
        sizes = ", ".join(
            f"{n} {s['versions']} versions {s['full'] / 1e6:.1f}/{s['abbreviated'] / 1e6:.1f} MB"
            for n, s in self.corpus.sizes.items()
        )
        self.say(f"corpus: {len(self.corpus.packages)} packages in {self.results['corpus']['seconds']}s; {sizes}")
        self.upstream = Child(
            corpus.UPSTREAM_SCRIPT, [str(self.corpus.root), str(self.upstream_port)], self.scratch / "upstream.log"
        )
        self.upstream.start()
        self.stoppers.append(self.upstream.stop)

    def hub(self, label: str, *, registries: list[HubRegistry] | None = None, workers: int = 1, **kw: Any) -> BenchHub:
        regs = registries or [HubRegistry("proxy", "proxy", (self.corpus.upstream_url + "/",))]
        kw["extra"] = kw.get("extra", "") + self.hub_toml
        kw["env"] = {**self.hub_env, **kw.get("env", {})}
        hub = BenchHub(self.scratch / label, regs, workers=workers, label=label, **kw)
        hub.start()
        self.stoppers.append(hub.stop)
        return hub

    def upstream_stats(self) -> dict[str, int]:
        status, _, body = http_get(f"{self.corpus.upstream_url}/-/bench/stats")
        if status != 200:
            raise BenchError(f"upstream stats: HTTP {status}")
        return dict(json.loads(body))

    def npm_install(self, registry: str, project: str, label: str, *, timeout: float = 900) -> dict[str, Any]:
        """`npm install` of a corpus project, fresh npm cache, no lockfile; checks the package count.
        With a short `timeout` npm does not retry failed requests (it would back off for minutes)."""
        from batlehub_npm_testing.clients import npm_env, run_npm

        folder = self.scratch / "projects" / label
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        manifest = {"name": f"scale-{project}", "version": "1.0.0", "private": True}
        manifest["dependencies"] = self.corpus.projects[project]
        (folder / "package.json").write_text(json.dumps(manifest, indent=2))
        env = npm_env(self.scratch / "npm", registry)
        if timeout < 900:
            env["npm_config_fetch_retries"] = "0"
        started = time.perf_counter()
        try:
            result = run_npm(
                ["install", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
                folder,
                env,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            self.say(f"npm install {project} via {label}: timed out after {timeout:.0f}s")
            return {
                "ok": False,
                "installed": 0,
                "expected": self.corpus.expected_installed(project),
                "seconds": timeout,
                "error": "timed out",
            }
        seconds = time.perf_counter() - started
        installed = sum(1 for _ in (folder / "node_modules").rglob("package.json")) if result.returncode == 0 else 0
        expected = self.corpus.expected_installed(project)
        ok = result.returncode == 0 and installed == expected
        self.say(
            f"npm install {project} via {label}: {'ok' if ok else 'FAILED'}, {installed}/{expected} in {seconds:.1f}s"
        )
        shutil.rmtree(folder, ignore_errors=True)
        return {
            "ok": ok,
            "installed": installed,
            "expected": expected,
            "seconds": round(seconds, 2),
            "error": "" if ok else (result.stdout[-1500:] + result.stderr[-1500:]),
        }

    # --- 1. big documents never stall anyone ---------------------------------------------------

    def stall(self) -> None:
        rounds = 1 if self.quick else 3
        runs = []
        curl = require_program("curl", "curl")
        for r in range(rounds):
            hub = self.hub(f"hub-stall-{r}")
            base = hub.registry_url("proxy")
            for accept in (NPM_ABBREVIATED_ACCEPT, FULL_ACCEPT):
                status, _, _ = http_get(base + SMALL_DOC, {"Accept": accept})
                if status != 200:
                    raise BenchError(f"stall: the small document answered {status}")
            probe = subprocess.Popen(
                [sys.executable, "-c", PROBE, base + SMALL_DOC, hub.url + "api/v1/admin/health"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert probe.stdout is not None
            if probe.stdout.readline().strip() != b"ready":
                raise BenchError("stall: the probe did not start")

            def fetch(i: int, base: str = base) -> int:
                # Clients run on other machines in real life; here niced, so that their CPU use
                # does not starve the hub and get counted as its stall.
                accept = NPM_ABBREVIATED_ACCEPT if i % 2 == 0 else FULL_ACCEPT
                out = subprocess.run(
                    [
                        *("nice", "-n", "10", curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--compressed"),
                        *("-H", f"Accept: {accept}", base + BIG),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                return int(out.stdout or 0)

            statuses = []
            phases = ["cold", "warm", "warm"]
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                for _phase in phases:
                    statuses += list(pool.map(fetch, range(8)))
            seconds = time.perf_counter() - started
            out, _ = probe.communicate(b"", timeout=120)
            data = json.loads(out)
            during, baseline = data["during"], data["baseline"]
            p99 = statistics.quantiles(during, n=100)[98] if len(during) >= 2 else max(during, default=0.0)
            delay = p99 - statistics.median(baseline)
            run = {
                "statuses_ok": statuses == [200] * len(statuses),
                "requests": len(statuses),
                "seconds": round(seconds, 2),
                "probes": len(during),
                "baseline_median_ms": round(statistics.median(baseline), 2),
                "p99_ms": round(p99, 2),
                "delay_ms": round(delay, 2),
                "slowest_ms": [round(x, 1) for x in sorted(during)[-5:]],
                "rss_mib_after": round(rss_bytes(hub.pid) / MIB, 1),
            }
            runs.append(run)
            self.say(
                f"stall round {r}: 8 clients x {len(phases)} ({', '.join(phases)}) of {BIG} in {seconds:.1f}s;"
                f" probe p99 {p99:.1f} ms over {len(during)} (baseline median {run['baseline_median_ms']} ms):"
                f" delay {delay:.1f} ms; statuses ok: {run['statuses_ok']}; RSS {run['rss_mib_after']} MiB"
            )
            hub.stop()
        self.results["stall"] = runs

    # --- 2. memory ------------------------------------------------------------------------------

    def rss(self) -> None:
        hub = self.hub("hub-rss")
        time.sleep(3)
        out: dict[str, Any] = {"idle_at_start_mib": round(rss_bytes(hub.pid) / MIB, 1)}
        self.say(f"rss: idle after start {out['idle_at_start_mib']} MiB")
        sampler = RssSampler(lambda: {hub.pid: rss_bytes(hub.pid)}, interval=0.05)
        with sampler:
            out["install_cold"] = self.npm_install(hub.registry_url("proxy"), "all", "rss-cold")
        out["peak_during_cold_install_mib"] = round(max(sampler.peak.values(), default=0) / MIB, 1)
        out["after_cold_install_mib"] = round(rss_bytes(hub.pid) / MIB, 1)
        sampler = RssSampler(lambda: {hub.pid: rss_bytes(hub.pid)}, interval=0.05)
        with sampler:
            out["install_warm"] = self.npm_install(hub.registry_url("proxy"), "all", "rss-warm")
        out["peak_during_warm_install_mib"] = round(max(sampler.peak.values(), default=0) / MIB, 1)
        out["after_warm_install_mib"] = round(rss_bytes(hub.pid) / MIB, 1)
        time.sleep(5 if self.quick else 15)
        out["idle_after_installs_mib"] = round(rss_bytes(hub.pid) / MIB, 1)
        status, _, body = http_get(
            hub.url + "api/v1/admin/registries/proxy/retention", {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        out["usage"] = json.loads(body)["usage"] if status == 200 else None
        out["storage_du_bytes"] = _du(hub.data_dir / "storage")
        out["data_dir_du_bytes"] = _du(hub.data_dir)
        self.results["rss"] = out
        self.say(
            f"rss: cold install peak {out['peak_during_cold_install_mib']} MiB, after {out['after_cold_install_mib']};"
            f" warm install peak {out['peak_during_warm_install_mib']}, after {out['after_warm_install_mib']};"
            f" idle after {out['idle_after_installs_mib']} MiB; proxied content {out['usage']}"
        )
        hub.stop()

    # --- 3. retention ---------------------------------------------------------------------------

    def retention(self) -> None:
        usage = (self.results.get("rss") or {}).get("usage")
        total = usage["bytes"] if usage else self.corpus.bytes_of("all")
        cap = int(total * 0.6)
        extra = f"[registries.retention]\nmax_bytes = {cap}\n"
        hub = self.hub(
            "hub-retention", registries=[HubRegistry("proxy", "proxy", (self.corpus.upstream_url + "/",), extra=extra)]
        )
        admin = hub.url + "api/v1/admin/registries/proxy/retention"
        out: dict[str, Any] = {"cap_bytes": cap, "tree_bytes_without_cap": total, "steps": []}

        def usage_now() -> int:
            status, _, body = http_get(admin, {"Authorization": f"Bearer {ADMIN_TOKEN}"})
            if status != 200:
                raise BenchError(f"retention usage: HTTP {status} {body[:300]!r}")
            return int(json.loads(body)["usage"]["bytes"])

        def step(label: str, project: str | None, *, run: bool = True) -> dict[str, Any]:
            entry: dict[str, Any] = {"step": label}
            before = self.upstream_stats() if project else {}
            if project:
                entry["install"] = self.npm_install(hub.registry_url("proxy"), project, f"ret-{label}")
                after = self.upstream_stats()
                # GETs only: retention's HEAD checks of the run before are counted too.
                grown = {
                    p: n - before.get(p, 0) for p, n in after.items() if p.startswith("GET ") and n > before.get(p, 0)
                }
                entry["upstream_tarball_fetches"] = sum(n for p, n in grown.items() if "/-/" in p)
                entry["upstream_document_fetches"] = sum(n for p, n in grown.items() if "/-/" not in p)
            entry["usage_before_run"] = usage_now()
            if run:
                status, report = _post_json(admin + "/run", {})
                if status != 200:
                    raise BenchError(f"retention run: HTTP {status} {report}")
                entry["report"] = {
                    k: report[k]
                    for k in ("bytes_before", "bytes_after", "evicted_count", "reclaimed_bytes", "kept_unchecked")
                }
                entry["report"]["stopped"] = report["stopped"]
                entry["report"]["kept_not_upstream"] = len(report["kept_not_upstream"])
                entry["usage_after_run"] = usage_now()
            # Blobs go DELETE_GRACE_SECS after their rows (no replica may still serve them): the
            # storage is measured once they are gone.
            time.sleep(DELETE_GRACE_SECS + 2 if run else 1)
            entry["storage_du_bytes"] = _du(hub.data_dir / "storage")
            out["steps"].append(entry)
            self.say(f"retention {label}: {json.dumps({k: v for k, v in entry.items() if k != 'install'})}")
            return entry

        step("install-one", "one")
        step("install-two", "two")
        step("reinstall-one-evicted", "one")
        step("reinstall-two", "two", run=False)
        self.upstream.stop()
        try:
            step("upstream-down-run", None)
            down: dict[str, Any] = {"step": "upstream-down-installs"}
            log = hub.root / "hub.log"
            mark = log.stat().st_size
            down["one"] = self.npm_install(hub.registry_url("proxy"), "one", "ret-down-one", timeout=240)
            down["two"] = self.npm_install(hub.registry_url("proxy"), "two", "ret-down-two", timeout=240)
            with log.open("rb") as f:
                f.seek(mark)
                failed = sorted(
                    {line.split()[5] for line in f.read().decode(errors="replace").splitlines() if " 502 " in line}
                )
            down["answered_502"] = failed
            out["steps"].append(down)
            self.say(f"retention, upstream down: installs ok {down['one']['ok']}/{down['two']['ok']}; 502 for {failed}")
        finally:
            self.upstream.start()
        # After the outage: retention may run again and brings the storage back under the cap.
        step("upstream-back-run", None)
        out["storage_du_bytes_at_end"] = _du(hub.data_dir / "storage")
        out["usage_at_end"] = usage_now()
        self.results["retention"] = out
        hub.stop()

    # --- 4. Redis cache -------------------------------------------------------------------------

    def redis(self) -> None:
        from batlehub.testing.services import RedisServer

        root = self.scratch / "redis"
        root.mkdir()
        redis = RedisServer(root)
        redis.start()
        self.stoppers.append(redis.process.stop)
        memory = self.hub("hub-memory-cache")
        with_redis = self.hub("hub-redis-cache", cache=f'type = "redis"\nurl = "{redis.url}"')
        headers = {**NPM_HEADERS, "Accept": NPM_ABBREVIATED_ACCEPT}
        for hub in (memory, with_redis):
            for _ in range(3):
                status, _, _ = http_get(hub.registry_url("proxy") + MID, headers)
                if status != 200:
                    raise BenchError(f"redis: {hub.label} answered {status} for {MID}")
            run_wrk(self.wrk, hub.registry_url("proxy") + MID, connections=16, duration=1, headers=headers)
        rounds = 2 if self.quick else 3
        pairs = []
        for conns in (1, 64) if self.quick else (1, 16, 64):
            runs: dict[str, list[LoadResult]] = {"memory": [], "redis": []}
            for _ in range(rounds):
                for label, hub in (("memory", memory), ("redis", with_redis)):
                    runs[label].append(
                        run_wrk(
                            self.wrk,
                            hub.registry_url("proxy") + MID,
                            connections=conns,
                            duration=self.duration,
                            headers=headers,
                            pids=lambda hub=hub: [hub.pid],
                        )
                    )
            best = {label: max(rs, key=lambda r: r.rps) for label, rs in runs.items()}
            pair = {
                "connections": conns,
                "memory_rps": best["memory"].rps,
                "redis_rps": best["redis"].rps,
                "ratio": round(best["redis"].rps / best["memory"].rps, 3) if best["memory"].rps else None,
                "memory_rps_per_cpu": best["memory"].rps_per_cpu,
                "redis_rps_per_cpu": best["redis"].rps_per_cpu,
                "errors": best["memory"].errors + best["redis"].errors,
                "runs": {label: [r.rps for r in rs] for label, rs in runs.items()},
            }
            pairs.append(pair)
            self.say(
                f"redis c={conns}: memory {pair['memory_rps']:.0f} req/s,"
                f" redis {pair['redis_rps']:.0f}: {pair['ratio']}x"
            )
        self.results["redis"] = {"pairs": pairs, "monitor": self._redis_monitor(redis.port, with_redis, headers)}
        memory.stop()
        with_redis.stop()

    def _redis_monitor(self, port: int, hub: BenchHub, headers: dict[str, str]) -> dict[str, Any]:
        """The Redis commands one abbreviated packument request makes (`redis-cli monitor`)."""
        cli = shutil.which("redis-cli")
        if cli is None:
            return {"error": "redis-cli not found"}
        requests = 20
        # The load runs just before may leave requests queued in the hub for a while: let them drain
        # (without this pause, one run counted 47 banner reads for 20 requests; 50 for 50 after it).
        time.sleep(3)
        monitor = subprocess.Popen([cli, "-p", str(port), "monitor"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        for _ in range(requests):
            http_get(hub.registry_url("proxy") + MID, headers)
        time.sleep(0.5)
        monitor.terminate()
        out, _ = monitor.communicate(timeout=10)
        commands: dict[str, int] = {}
        for line in out.splitlines():
            parts = line.split('"')
            if len(parts) < 4:
                continue
            words = [p for i, p in enumerate(parts) if i % 2 == 1]
            key = " ".join(words[:2])
            for digit in "0123456789":  # fold counters and timestamps into one line per kind
                key = key.replace(digit, "#")
            commands[key] = commands.get(key, 0) + 1
        total = sum(commands.values())
        result = {
            "requests": requests,
            "commands": total,
            "per_request": round(total / requests, 2),
            "by_kind": dict(sorted(commands.items(), key=lambda kv: -kv[1])),
        }
        self.say(f"redis monitor: {total} commands for {requests} requests: {result['by_kind']}")
        return result

    # --- 5. raised targets ----------------------------------------------------------------------

    def raised(self) -> None:
        say = self.say
        verdaccio = start_verdaccio(self.scratch / "verdaccio")
        self.stoppers.append(verdaccio.process.stop)
        self._publish_to_verdaccio(verdaccio.url, verdaccio.token, MID)
        nginx = start_static_nginx(self.scratch / "nginx", self.corpus.root / "tarballs")
        self.stoppers.append(nginx.stop)
        upstream = (self.corpus.upstream_url + "/",)
        hub = self.hub(
            "hub-raised",
            registries=[
                HubRegistry("proxy", "proxy", upstream),
                HubRegistry("secured", "proxy", upstream, extra=SECURED),
            ],
            extra=USER_TOKEN_TOML,
        )
        abbreviated = {**NPM_HEADERS, "Accept": NPM_ABBREVIATED_ACCEPT}
        token = {"Authorization": f"Bearer {USER_TOKEN}"}
        status, _, _ = http_get(hub.registry_url("secured") + MID, abbreviated)
        if status != 401:
            raise BenchError(f"raised: the secured registry answered {status} without a token, not 401")
        status, answer, prepared = http_get(hub.registry_url("secured") + MID, {**abbreviated, **token})
        if status != 200 or "X-RateLimit-Limit" not in answer:
            raise BenchError(f"raised: secured registry answered {status} ({answer})")
        status, answer, prepared = http_get(hub.registry_url("proxy") + MID, abbreviated)
        (self.scratch / "bare.body").write_bytes(prepared)
        keep = ("Content-Type", "Content-Encoding", "ETag", "Vary", "Cache-Control", "Last-Modified")
        (self.scratch / "bare.headers").write_text(json.dumps({k: v for k, v in answer.items() if k in keep}))
        bare_port = free_port()
        bare = Child(
            BARE,
            [str(self.scratch / "bare.body"), str(self.scratch / "bare.headers"), str(bare_port)],
            self.scratch / "bare.log",
        )
        bare.start()
        self.stoppers.append(bare.stop)
        duties_port = free_port()
        duties = Child(
            BARE_DUTIES,
            [
                str(self.scratch / "bare.body"),
                str(self.scratch / "bare.headers"),
                str(duties_port),
                str(self.scratch / "bare-duties.access.log"),
            ],
            self.scratch / "bare-duties.log",
        )
        duties.start()
        self.stoppers.append(duties.stop)
        big = self.corpus.packages[corpus.BIG_TARBALL_NAME]
        _, _, body = http_get(hub.registry_url("proxy") + big.name, abbreviated)
        hub_tarball = json.loads(_decoded(body))["versions"][big.latest]["dist"]["tarball"]
        expected = self.corpus.tarball_path(big.name).read_bytes()
        nginx_tarball = f"{nginx.url}/{big.name}/-/{big.name}-{big.latest}.tgz"
        for url in (hub_tarball, nginx_tarball):
            status, _, data = http_get(url)
            if status != 200 or data != expected:
                raise BenchError(f"raised: {url} answered {status} with other bytes")
        vd = {"Authorization": f"Bearer {verdaccio.token}"}
        status, _, vbody = http_get(verdaccio.url + MID, {**abbreviated, **vd})
        if status != 200 or len(json.loads(_decoded(vbody))["versions"]) != corpus.MID_SHAPE.versions:
            raise BenchError(f"raised: Verdaccio answered {status} for {MID}")
        cases = {
            "abbreviated": [
                ("hub-secured", hub.registry_url("secured") + MID, {**abbreviated, **token}, lambda: [hub.pid]),
                ("hub-proxy", hub.registry_url("proxy") + MID, abbreviated, lambda: [hub.pid]),
                (
                    "bare-aiohttp",
                    f"http://127.0.0.1:{bare_port}/{MID}",
                    abbreviated,
                    lambda: [bare.proc.pid] if bare.proc else [],
                ),
                (
                    "bare-duties",
                    f"http://127.0.0.1:{duties_port}/{MID}",
                    abbreviated,
                    lambda: [duties.proc.pid] if duties.proc else [],
                ),
                ("verdaccio", verdaccio.url + MID, {**abbreviated, **vd}, lambda: [verdaccio.process.proc.pid]),  # type: ignore[union-attr]
            ],
            "tarball": [
                ("hub-proxy", hub_tarball, dict(NPM_HEADERS), lambda: [hub.pid]),
                ("nginx", nginx_tarball, dict(NPM_HEADERS), list),
            ],
        }
        for rows in cases.values():
            for _, url, headers, _ in rows:
                run_wrk(self.wrk, url, connections=16, duration=1, headers=headers)
        load = []
        rounds = 1 if self.quick else 2
        for case, rows in cases.items():
            for conns in (1, 64) if self.quick else (1, 16, 64):
                for _ in range(rounds):
                    for server, url, headers, pids in rows:
                        result = run_wrk(
                            self.wrk, url, connections=conns, duration=self.duration, headers=headers, pids=pids
                        )
                        load.append({"case": case, "server": server, **result.as_dict()})
                best = {
                    s: max(
                        (r for r in load if r["case"] == case and r["server"] == s and r["connections"] == conns),
                        key=lambda r: r["rps"],
                    )
                    for s, *_ in rows
                }
                say(
                    f"{case} c={conns}: "
                    + ", ".join(f"{s} {r['rps']:.0f} req/s (p99 {r['p99_ms']:.1f} ms)" for s, r in best.items())
                )
        self.results["raised"] = {"load": load}
        for conns in (1, 64) if self.quick else (1, 16, 64):
            rates = {
                s: max(
                    r["rps"]
                    for r in load
                    if r["case"] == "abbreviated" and r["server"] == s and r["connections"] == conns
                )
                for s in ("bare-aiohttp", "bare-duties", "hub-proxy")
            }
            say(
                f"reference c={conns}: bare aiohttp + the per-request duties / bare aiohttp"
                f" {rates['bare-duties'] / rates['bare-aiohttp']:.2f}x; hub-proxy / bare + duties"
                f" {rates['hub-proxy'] / rates['bare-duties']:.2f}x"
            )
        # Workers: the same document from a second hub with two worker processes on the same data.
        hub2 = self.hub(
            "hub-raised-2w",
            registries=[HubRegistry("proxy", "proxy", upstream)],
            workers=2,
            data_dir=hub.data_dir,
        )
        url_path = "registries/proxy/" + MID
        for h in (hub, hub2):
            run_wrk(self.wrk, h.url + url_path, connections=16, duration=1, headers=abbreviated)
        runs: dict[str, list[LoadResult]] = {"one": [], "two": []}
        for _ in range(2):
            for label, h in (("one", hub), ("two", hub2)):
                runs[label].append(
                    run_wrk(
                        self.wrk,
                        h.url + url_path,
                        connections=64,
                        duration=self.duration,
                        headers=abbreviated,
                        pids=h.server_pids,
                    )
                )
        one, two = (max(runs[k], key=lambda r: r.rps) for k in ("one", "two"))
        self.results["raised"]["workers"] = {
            "one": one.as_dict(),
            "two": two.as_dict(),
            "runs": {k: [r.rps for r in v] for k, v in runs.items()},
        }
        say(f"workers c=64: 1 worker {one.rps:.0f} req/s, 2 workers {two.rps:.0f} req/s ({two.rps / one.rps:.2f}x)")
        hub2.stop()

    def _publish_to_verdaccio(self, url: str, token: str, name: str) -> None:
        package = self.corpus.packages[name]
        unscoped = name.rsplit("/", 1)[-1]
        for version, manifest in package.document["versions"].items():
            import base64

            data = package.tarballs[f"{unscoped}-{version}.tgz"]
            body = {
                "_id": name,
                "name": name,
                "dist-tags": {"latest": version},
                "versions": {
                    version: {
                        **manifest,
                        "dist": {**manifest["dist"], "tarball": f"{url}{name}/-/{unscoped}-{version}.tgz"},
                    }
                },
                "_attachments": {
                    f"{unscoped}-{version}.tgz": {
                        "content_type": "application/octet-stream",
                        "data": base64.b64encode(data).decode(),
                        "length": len(data),
                    }
                },
            }
            status, answer = packages.put(url + package.url_name, token, json.dumps(body).encode())
            if status not in (200, 201):
                raise BenchError(f"publishing {name}@{version} to Verdaccio: HTTP {status} {answer[:300]!r}")
        # The latest tag as upstream has it (versions were published in order, so it is the last).
        self.say(f"published {len(package.document['versions'])} versions of {name} to Verdaccio")

    # --- targets and report ----------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return {
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": self.load_at_start,
            "load_average_at_end": os.getloadavg(),
            "quick": self.quick,
            "duration_s": self.duration,
            "git_commit": git.stdout.strip() or "unknown",
            "hub_toml": self.hub_toml,
            "hub_env": self.hub_env,
            "python": sys.version.split()[0],
        }


def _best(load: list[dict[str, Any]], case: str, server: str, conns: int) -> dict[str, Any] | None:
    rows = [r for r in load if r["case"] == case and r["server"] == server and r["connections"] == conns]
    return max(rows, key=lambda r: r["rps"]) if rows else None


def evaluate(results: dict[str, Any]) -> list[Target]:
    targets: list[Target] = []
    stall = results.get("stall") or []
    if stall:
        delays = [r["delay_ms"] if r["statuses_ok"] else None for r in stall]
        value = statistics.median([d for d in delays if d is not None]) if all(d is not None for d in delays) else None
        targets.append(
            Target(
                "p99 delay of a small document + health while 8 clients fetch a 20 MB document (median of rounds)",
                value,
                STALL_BUDGET_MS,
                False,
                "ms",
                " ".join(f"{d}" for d in delays),
            )
        )
    rss = results.get("rss")
    if rss:
        targets.append(Target("idle RSS after start", rss["idle_at_start_mib"], 80, False, "MiB"))
        ok = rss["install_cold"]["ok"] and rss["install_warm"]["ok"]
        worst = max(rss["after_cold_install_mib"], rss["after_warm_install_mib"], rss["idle_after_installs_mib"])
        targets.append(
            Target(
                f"RSS after installing the {rss['install_cold']['expected']}-package tree (cold + warm, worst)",
                worst if ok else None,
                150,
                False,
                "MiB",
                f"peaks during installs {rss['peak_during_cold_install_mib']}/{rss['peak_during_warm_install_mib']}",
            )
        )
    ret = results.get("retention")
    if ret:
        cap = ret["cap_bytes"]
        up_runs = [s for s in ret["steps"] if "usage_after_run" in s and s["step"] != "upstream-down-run"]
        worst = max((s["usage_after_run"] for s in up_runs), default=None)
        targets.append(
            Target(
                "retention: proxied bytes after each run / cap (upstream up)",
                None if worst is None else worst / cap,
                1.0,
                False,
                "x",
                f"cap {cap} B; after runs {[s['usage_after_run'] for s in up_runs]}",
            )
        )
        targets.append(
            Target("retention: proxied bytes fetched in the workload / cap", _workload(ret) / cap, 2.0, True)
        )
        reinstall = next((s for s in ret["steps"] if s["step"] == "reinstall-one-evicted"), None)
        if reinstall:
            refetched = reinstall["upstream_tarball_fetches"] + reinstall.get("upstream_document_fetches", 0)
            targets.append(
                Target(
                    "retention: re-install of the evicted set works, re-fetched from upstream",
                    float(reinstall["install"]["ok"] and refetched > 0),
                    1,
                    True,
                    "ok",
                    f"{reinstall['upstream_tarball_fetches']} tarballs and"
                    f" {reinstall.get('upstream_document_fetches', 0)} documents fetched again",
                )
            )
        down = next((s for s in ret["steps"] if s["step"] == "upstream-down-run"), None)
        installs = next((s for s in ret["steps"] if s["step"] == "upstream-down-installs"), None)
        if down and installs:
            ok = down["report"]["evicted_count"] == 0 and installs["one"]["ok"] and installs["two"]["ok"]
            targets.append(
                Target(
                    "retention: upstream down, nothing evicted, both projects install from the hub",
                    float(ok),
                    1,
                    True,
                    "ok",
                    f"evicted {down['report']['evicted_count']}, stopped: {down['report']['stopped']!r}",
                )
            )
    redis = results.get("redis")
    if redis:
        ratios = [p["ratio"] for p in redis["pairs"]]
        targets.append(
            Target(
                "abbreviated packument rps, redis cache / memory cache (worst concurrency)",
                min((r for r in ratios if r is not None), default=None),
                0.7,
                True,
                detail=" ".join(str(r) for r in ratios),
            )
        )
    raised = results.get("raised")
    if raised:
        load = raised["load"]
        conns = sorted({r["connections"] for r in load})

        def ratio(case: str, a: str, b: str) -> tuple[float | None, str]:
            values = []
            for c in conns:
                x, y = _best(load, case, a, c), _best(load, case, b, c)
                values.append(x["rps"] / y["rps"] if x and y and y["rps"] else None)
            present = [v for v in values if v is not None]
            return (min(present) if present else None), " ".join("—" if v is None else f"{v:.2f}" for v in values)

        for name, case, a, b, need in (
            ("1 MiB tarball rps, hub-proxy / nginx", "tarball", "hub-proxy", "nginx", 0.8),
            (
                "abbreviated rps, hub with tokens+RBAC+rate limit / verdaccio (token)",
                "abbreviated",
                "hub-secured",
                "verdaccio",
                40,
            ),
            (
                "abbreviated rps, hub-proxy (anonymous) / bare aiohttp, same bytes",
                "abbreviated",
                "hub-proxy",
                "bare-aiohttp",
                0.7,
            ),
            (
                "abbreviated rps, hub with tokens+RBAC+rate limit / bare aiohttp",
                "abbreviated",
                "hub-secured",
                "bare-aiohttp",
                0.7,
            ),
        ):
            value, detail = ratio(case, a, b)
            targets.append(Target(name + " (worst concurrency)", value, need, True, detail=detail))
        workers = raised.get("workers")
        if workers:
            targets.append(
                Target(
                    "abbreviated rps c=64, 2 workers / 1 worker",
                    workers["two"]["rps"] / workers["one"]["rps"] if workers["one"]["rps"] else None,
                    1.8,
                    True,
                    detail=f"{workers['one']['rps']:.0f} vs {workers['two']['rps']:.0f} req/s",
                )
            )
    return targets


def _workload(ret: dict[str, Any]) -> int:
    """Bytes of proxied content the runs saw in total: each install's growth of the usage."""
    total, previous = 0, 0
    for s in ret["steps"]:
        if "usage_before_run" in s:
            total += max(0, s["usage_before_run"] - previous)
            previous = s.get("usage_after_run", s["usage_before_run"])
    return total


def markdown(results: dict[str, Any], targets: list[Target]) -> list[str]:
    lines = ["| target | measured | need | result |", "|---|---|---|---|"]
    for t in targets:
        value = "—" if t.value is None else (f"{t.value:.2f}" if t.unit != "ok" else ("yes" if t.value else "no"))
        need = ("≥ " if t.higher_is_better else "≤ ") + (f"{t.limit:g} {t.unit}" if t.unit != "ok" else "yes")
        note = f" ({t.detail})" if t.detail else ""
        lines.append(
            f"| {t.name}{note} | {value} {t.unit if t.unit not in ('ok', 'x') else ''}".rstrip()
            + f" | {need} | {'PASS' if t.passed else 'FAIL'} |"
        )
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="run.py --suite scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs and fewer rounds (a few minutes)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 5, quick 2)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    parser.add_argument("--markdown", metavar="FILE", help="also write the targets table as Markdown")
    parser.add_argument(
        "--scenario", action="append", choices=["stall", "rss", "retention", "redis", "raised"], help="repeatable"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is not met")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder afterwards")
    parser.add_argument(
        "--hub-toml",
        action="append",
        metavar="TOML",
        help="top-level TOML for every hub, e.g. '[limits]\\ncache_memory_bytes = 16777216' (repeatable)",
    )
    parser.add_argument("--hub-env", action="append", metavar="KEY=VALUE", help="environment of every hub")
    args = parser.parse_args(argv)
    scale = Scale(args)
    try:
        results = scale.run()
    except BenchError as exc:
        print(f"\nbench: FAILED: {exc}", file=sys.stderr, flush=True)
        return 2
    targets = evaluate(results)
    results["targets"] = [t.as_dict() for t in targets]
    table = markdown(results, targets)
    print("\n".join(["", *table]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nresults written to {out}", flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(table) + "\n")
    if results["errors"]:
        print(f"scenarios that failed to run: {sorted(results['errors'])}", flush=True)
    failed = [t for t in targets if not t.passed]
    return 1 if (failed or results["errors"]) and args.strict else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
