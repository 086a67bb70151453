"""BatleHub's PyPI format side by side with devpi-server, on the same data, in one run.

    .venv/bin/python bench/pypi.py [--quick] [--out bench/results/pypi.json] [--markdown FILE]

Starts devpi-server (installed into `.services/devpi` on first use) and a hub with two PyPI
registries, `local` (the data uploaded to it) and `proxy` (in front of devpi, warmed), uploads the
same wheels to devpi and to hub-local with twine, then measures with wrk the PEP 691 JSON page of a
project with 500 files, and times a warm `pip install` of a 50-package dependency tree with a fresh
pip cache. Prints the tables and the targets of issue 12; see bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import BenchError
from benchkit.load import cpu_seconds, run_wrk
from benchkit.servers import ADMIN_TOKEN, REPO, BenchHub, HubRegistry, http_get, program_version, require_program

try:
    from batlehub_pypi_testing.clients import client_env, ok, pip_install, twine_upload, uv_pip_install
    from batlehub_pypi_testing.packages import write_wheel

    from batlehub.testing.services import LOOPBACK, ManagedProcess, free_port, wait_until
except ImportError as exc:  # pragma: no cover - the venv lacks the project
    raise SystemExit(f"bench: {exc}; run `.venv/bin/pip install -e . -e plugins/npm -e plugins/pypi[test]`") from exc

DEVPI_VERSION = "6.20.3"
MANY_FILES_NAME = "bench-many-files"
MANY_FILES = 500
TREE_SIZE = 50
JSON_ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01"
CLIENT_HEADERS = {"Accept": JSON_ACCEPT, "Accept-Encoding": "gzip, deflate", "User-Agent": "uv/0.13 bench"}
ROOT_PASSWORD = "bench-root-password"
UPLOADERS = 4


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- devpi-server -----------------------------------------------------------------------------------


def install_devpi() -> Path:
    """devpi-server in its own venv under `.services/devpi` (its dependencies stay out of ours)."""
    root = REPO / ".services" / "devpi"
    stamp = root / ".installed"
    if stamp.exists() and stamp.read_text() == DEVPI_VERSION:
        return root / "venv" / "bin"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    result = subprocess.run(
        [str(root / "venv" / "bin" / "pip"), "install", "-q", f"devpi-server=={DEVPI_VERSION}"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        raise BenchError(f"installing devpi-server failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    stamp.write_text(DEVPI_VERSION)
    return root / "venv" / "bin"


class Devpi:
    """devpi-server in offline mode with one index, `root/dev` (no bases: it never looks elsewhere)."""

    def __init__(self, bin_dir: Path, root: Path) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.port = free_port()
        server_dir = root / "server"
        subprocess.run(
            [str(bin_dir / "devpi-init"), "--serverdir", str(server_dir), "--root-passwd", ROOT_PASSWORD],
            check=True,
            capture_output=True,
            timeout=120,
        )
        argv = [str(bin_dir / "devpi-server"), "--serverdir", str(server_dir), "--host", LOOPBACK]
        argv += ["--port", str(self.port), "--offline-mode"]
        self.process = ManagedProcess(argv, root / "devpi.log", cwd=root)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/"

    @property
    def upload_url(self) -> str:
        return self.url + "root/dev/"

    @property
    def index_url(self) -> str:
        return self.url + "root/dev/+simple/"

    def start(self) -> None:
        self.process.start()
        wait_until(lambda: http_get(self.url + "+api")[0] == 200, what="devpi", timeout=120, process=self.process)
        status, _, body = _json_request("POST", self.url + "+login", {"user": "root", "password": ROOT_PASSWORD})
        if status != 200:
            raise BenchError(f"devpi login: HTTP {status} {body[:300]!r}")
        token = json.loads(body)["result"]["password"]
        auth = {"X-Devpi-Auth": base64.b64encode(f"root:{token}".encode()).decode()}
        status, _, body = _json_request("PUT", self.url + "root/dev", {"type": "stage", "bases": []}, auth)
        if status not in (200, 201):
            raise BenchError(f"devpi: creating root/dev: HTTP {status} {body[:300]!r}")

    def stop(self) -> None:
        self.process.stop()


def _json_request(
    method: str, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json", "Accept": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


# --- data -----------------------------------------------------------------------------------------


def tree_name(index: int) -> str:
    return f"bench-tree-{index:02d}"


def build_data(out: Path) -> tuple[list[Path], list[Path]]:
    """500 releases of one project (one wheel each), and a 50-package tree: package i depends on
    2i+1 and 2i+2, so installing package 0 pulls in all of them."""
    many = [write_wheel(MANY_FILES_NAME, f"1.0.{i}", out / "many", payload=b"#" * 2048) for i in range(MANY_FILES)]
    tree = []
    for i in range(TREE_SIZE):
        deps = [tree_name(j) for j in (2 * i + 1, 2 * i + 2) if j < TREE_SIZE]
        tree.append(write_wheel(tree_name(i), "1.0.0", out / "tree", dependencies=deps, payload=b"#" * 4096))
    return many, tree


# --- measurements ---------------------------------------------------------------------------------


def check_page(url: str) -> int:
    status, headers, body = http_get(url, {"Accept": JSON_ACCEPT})
    if status != 200 or "json" not in headers.get("Content-Type", ""):
        raise BenchError(f"{url}: HTTP {status} {headers.get('Content-Type')}")
    return len(json.loads(body)["files"])


def pip_tree(index_url: str, scratch: Path) -> tuple[float, float]:
    """Wall seconds of the install, and the CPU seconds pip itself used."""
    target = Path(tempfile.mkdtemp(dir=scratch))
    env = client_env(scratch)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    ok(pip_install(index_url, [tree_name(0)], target, env, "--no-cache-dir", "--no-compile"))
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    installed = len(list(target.glob("*.dist-info")))
    if installed != TREE_SIZE:
        raise BenchError(f"pip installed {installed} packages from {index_url}, expected {TREE_SIZE}")
    shutil.rmtree(target, ignore_errors=True)
    return elapsed, client_cpu


def uv_tree(index_url: str, scratch: Path) -> float:
    """Wall seconds of `uv pip install` of the tree, no cache: uv's own overhead is small, so
    this shows more of the servers' part than pip does."""
    target = Path(tempfile.mkdtemp(dir=scratch))
    started = time.perf_counter()
    ok(uv_pip_install(index_url, [tree_name(0)], target, client_env(scratch), "--no-cache"))
    elapsed = time.perf_counter() - started
    installed = len(list(target.glob("*.dist-info")))
    if installed != TREE_SIZE:
        raise BenchError(f"uv installed {installed} packages from {index_url}, expected {TREE_SIZE}")
    shutil.rmtree(target, ignore_errors=True)
    return elapsed


def markdown(results: dict[str, Any]) -> list[str]:
    servers = results["servers"]
    lines = [
        f"**PEP 691 JSON page of a project with {MANY_FILES} files** (requests/s, p99 ms, requests per server CPU-s)",
        "",
        "| conc | " + " | ".join(servers) + " | hub-local/devpi | hub-proxy/devpi |",
        "|---|" + "---|" * (len(servers) + 2),
    ]
    for conc in results["concurrency"]:
        row = {r["server"]: r for r in results["load"] if r["connections"] == conc}
        cells = [f"{row[s]['rps']:.0f} ({row[s]['p99_ms']:.1f}, {row[s]['rps_per_cpu'] or 0:.0f})" for s in servers]
        ratios = [f"{row[s]['rps'] / row['devpi']['rps']:.1f}x" for s in ("hub-local", "hub-proxy")]
        lines.append(f"| {conc} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += [
        "",
        f"**pip install of a {TREE_SIZE}-package tree**, fresh pip cache, warm servers: wall seconds",
        "",
        "| index | runs (CPU-s of pip / of the server) | best |",
        "|---|---|---|",
    ]
    for server, times in results["pip"].items():
        runs = zip(times, results["pip_client_cpu_s"][server], results["pip_server_cpu_s"][server], strict=True)
        cells = ", ".join(f"{t:.2f} ({c:.2f}/{s:.2f})" for t, c, s in runs)
        lines.append(f"| {server} | {cells} | {min(times):.2f} |")
    lines += [
        "",
        "**uv pip install of the same tree**, no cache (not a target): wall seconds",
        "",
        "| index | runs | best |",
        "|---|---|---|",
    ]
    for server, times in results.get("uv", {}).items():
        lines.append(f"| {server} | {', '.join(f'{t:.2f}' for t in times)} | {min(times):.2f} |")
    lines += ["", "**Targets**", "", "| target | value | need | result |", "|---|---|---|---|"]
    for target in results["targets"]:
        lines.append(
            f"| {target['name']} | {target['value']:.2f} | {target['need']} | {'PASS' if target['ok'] else 'FAIL'} |"
        )
    return lines


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    for server in ("hub-local", "hub-proxy"):
        worst = min(
            r["rps"] / d["rps"]
            for r in results["load"]
            if r["server"] == server
            for d in results["load"]
            if d["server"] == "devpi" and d["connections"] == r["connections"]
        )
        targets.append({"name": f"JSON page rps, {server} / devpi", "value": worst, "need": ">= 5x", "ok": worst >= 5})
    devpi = min(results["pip"]["devpi"])
    for server in ("hub-local", "hub-proxy"):
        ratio = min(results["pip"][server]) / devpi
        targets.append(
            {"name": f"pip install, {server} / devpi (wall)", "value": ratio, "need": "<= 0.9x", "ok": ratio <= 0.9}
        )
    return targets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s runs, concurrency 1 and 32, 2 pip rounds")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 5, quick 2)")
    parser.add_argument("--concurrency", type=int, action="append", help="repeatable (default 1, 16, 64)")
    parser.add_argument("--repeats", type=int, help="pip install rounds per server (default 3, quick 2)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pypi.json")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    duration = args.duration or (2.0 if args.quick else 5.0)
    concurrency = args.concurrency or ([1, 32] if args.quick else [1, 16, 64])
    repeats = args.repeats or (2 if args.quick else 3)
    scratch = Path(tempfile.mkdtemp(prefix="batlehub-bench-pypi-"))
    stoppers: list[Any] = []
    try:
        wrk = require_program("wrk", "wrk")
        say("installing devpi-server if needed")
        devpi = Devpi(install_devpi(), scratch / "devpi")
        devpi.start()
        stoppers.append(devpi.stop)
        say(f"devpi-server at {devpi.url}")
        hub = BenchHub(
            scratch / "hub",
            [
                HubRegistry("local", "local", type="pypi"),
                HubRegistry("proxy", "proxy", (devpi.index_url,), type="pypi"),
            ],
        )
        hub.start()
        stoppers.append(hub.stop)
        say(f"hub at {hub.url}")

        many, tree = build_data(scratch / "dists")
        files = many + tree
        env = client_env(scratch)
        say(f"uploading {len(files)} wheels to devpi and to hub-local with twine")
        for url, user, password in (
            (devpi.upload_url, "root", ROOT_PASSWORD),
            (hub.registry_url("local"), "__token__", ADMIN_TOKEN),
        ):
            started = time.perf_counter()
            # Four twine processes at once: devpi takes ~0.2 s per upload, one after another minutes.
            chunks = [files[i::UPLOADERS] for i in range(UPLOADERS)]
            credentials = ("-u", user, "-p", password)
            with concurrent.futures.ThreadPoolExecutor(UPLOADERS) as pool:
                for result in pool.map(
                    twine_upload,
                    [url] * UPLOADERS,
                    chunks,
                    [env] * UPLOADERS,
                    [None] * UPLOADERS,
                    *([c] * UPLOADERS for c in credentials),
                ):
                    ok(result)
            say(f"  {url}: {time.perf_counter() - started:.1f} s")

        pages = {
            "hub-local": hub.registry_url("local") + f"simple/{MANY_FILES_NAME}/",
            "hub-proxy": hub.registry_url("proxy") + f"simple/{MANY_FILES_NAME}/",
            "devpi": devpi.index_url + f"{MANY_FILES_NAME}/",
        }
        indexes = {
            "hub-local": hub.registry_url("local") + "simple/",
            "hub-proxy": hub.registry_url("proxy") + "simple/",
            "devpi": devpi.index_url,
        }
        for server, url in pages.items():
            count = check_page(url)
            if count != MANY_FILES:
                raise BenchError(f"{server} lists {count} files of {MANY_FILES_NAME}, expected {MANY_FILES}")
        say("warming hub-proxy with a pip install through it")
        pip_tree(indexes["hub-proxy"], scratch)

        devpi_pids = [devpi.process.proc.pid] if devpi.process.proc else []
        pids = {"hub-local": hub.server_pids, "hub-proxy": hub.server_pids, "devpi": lambda: devpi_pids}
        load = []
        for conc in concurrency:
            for server, url in pages.items():
                for _ in range(2):  # warm-up, then the measured run
                    result = run_wrk(
                        wrk, url, connections=conc, duration=duration, headers=CLIENT_HEADERS, pids=pids[server]
                    )
                if result.errors > result.requests * 0.05:
                    raise BenchError(f"{server} at c={conc}: {result.errors} errors in {result.requests} requests")
                load.append({"server": server, **result.as_dict()})
                say(f"JSON page {server:9s} c={conc:<3d} {result.rps:8.0f} req/s  p99 {result.p99_ms:.1f} ms")

        pip_times: dict[str, list[float]] = {server: [] for server in indexes}
        pip_cpu: dict[str, list[float]] = {server: [] for server in indexes}
        pip_client_cpu: dict[str, list[float]] = {server: [] for server in indexes}
        for round_ in range(repeats):
            for server, url in indexes.items():
                before = cpu_seconds(pids[server]())
                elapsed, client_cpu = pip_tree(url, scratch)
                pip_times[server].append(round(elapsed, 3))
                pip_cpu[server].append(round(cpu_seconds(pids[server]()) - before, 3))
                pip_client_cpu[server].append(round(client_cpu, 3))
                say(
                    f"pip install round {round_ + 1} {server:9s} {elapsed:.2f} s"
                    f" (CPU-s: pip {client_cpu:.2f}, server {pip_cpu[server][-1]:.2f})"
                )

        uv_times: dict[str, list[float]] = {server: [] for server in indexes}
        for round_ in range(repeats):
            for server, url in indexes.items():
                uv_times[server].append(round(uv_tree(url, scratch), 3))
                say(f"uv install round {round_ + 1} {server:9s} {uv_times[server][-1]:.2f} s")

        results: dict[str, Any] = {
            "servers": list(pages),
            "concurrency": concurrency,
            "load": load,
            "pip": pip_times,
            "pip_server_cpu_s": pip_cpu,
            "pip_client_cpu_s": pip_client_cpu,
            "uv": uv_times,
            "meta": {
                "cpus": os.cpu_count(),
                "loadavg": os.getloadavg(),
                "duration_s": duration,
                "devpi_server": DEVPI_VERSION,
                "pip": program_version([sys.executable, "-m", "pip", "--version"]),
                "wrk": program_version([wrk, "--version"]),
                "commit": program_version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
                "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            },
        }
        results["targets"] = evaluate(results)
        text = markdown(results)
        print("\n".join(text))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        if args.markdown:
            args.markdown.write_text("\n".join(text) + "\n")
        if args.strict and not all(t["ok"] for t in results["targets"]):
            return 1
        return 0
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    finally:
        for stop in reversed(stoppers):
            with contextlib.suppress(Exception):
                stop()
        if args.keep:
            say(f"scratch folder kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
