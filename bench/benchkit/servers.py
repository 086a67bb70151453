"""The servers a benchmark run compares, each started on a free loopback port in a scratch folder:
Verdaccio (the peer), nginx serving the same tarball bytes as static files (the ceiling), and
BatleHub hub processes (`python -m batlehub serve`).

Missing programs are installed the way the test harness does (apt-get for wrk and nginx, npm into
`.services/node` for Verdaccio); if that fails the run stops with a message saying what is missing.
A benchmark never skips a server: a table without its peer would be a table of nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchkit import BenchError

REPO = Path(__file__).resolve().parents[2]

try:
    from batlehub_npm_testing.services import NodeTools, VerdaccioServer, install_node_tools

    from batlehub.testing.hub import Hub, serve_env
    from batlehub.testing.nginx import Nginx
    from batlehub.testing.services import LOOPBACK, ManagedProcess, ServiceStartError, free_port
except ImportError as exc:  # pragma: no cover - the venv lacks the project
    raise SystemExit(
        f"bench: cannot import the test kits ({exc}); run `.venv/bin/pip install -e . -e plugins/npm` first"
    ) from exc

__all__ = ["ManagedProcess", "NodeTools", "ServiceStartError", "free_port"]


def _apt_install(package: str) -> None:
    if os.geteuid() != 0:
        raise BenchError(f"{package} is missing; install it (`sudo apt-get install -y {package}`) and run again")
    result = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", package],
        capture_output=True,
        text=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        timeout=600,
    )
    if result.returncode != 0:
        # A fresh machine may have an empty package index.
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=600)
        result = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", package],
            capture_output=True,
            text=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            timeout=600,
        )
    if result.returncode != 0:
        raise BenchError(f"`apt-get install -y {package}` failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def require_program(name: str, apt_package: str, *extra_dirs: str) -> str:
    """The path of `name`, installing `apt_package` first if it is not there."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *extra_dirs])
    found = shutil.which(name, path=search)
    if found is None:
        _apt_install(apt_package)
        found = shutil.which(name, path=search)
    if found is None:
        raise BenchError(f"{name} is still missing after installing {apt_package}")
    return found


def program_version(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return f"unknown ({exc})"
    text = (result.stdout + result.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


# --- RSS ------------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (VmRSS), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return children


# --- Verdaccio --------------------------------------------------------------------------------------


class BenchVerdaccio(VerdaccioServer):
    """The test harness's Verdaccio (no uplinks, htpasswd) with JWT API tokens.

    With its default "legacy" tokens Verdaccio re-checks the user's bcrypt password on every
    authenticated request (~100 ms), which would make publishing the data set take minutes. Reads
    in the benchmark are anonymous, so this changes nothing that is measured.
    """

    def _write_config(self) -> None:
        super()._write_config()
        config = json.loads(self.config_path.read_text())
        config["security"] = {"api": {"jwt": {"sign": {"expiresIn": "7d"}}}}
        self.config_path.write_text(json.dumps(config, indent=2))


def start_verdaccio(root: Path) -> VerdaccioServer:
    """Verdaccio with no uplinks and htpasswd auth (the test harness's own setup), plus a token."""
    try:
        tools = install_node_tools()
        root.mkdir(parents=True, exist_ok=True)
        server = BenchVerdaccio(tools, root)
        server.start()
    except ServiceStartError as exc:
        raise BenchError(f"Verdaccio could not be started: {exc}") from exc
    return server


def verdaccio_version(tools: NodeTools) -> str:
    manifest = tools.root / "node_modules" / "verdaccio" / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "unknown"


# --- nginx --------------------------------------------------------------------------------------


def start_static_nginx(root: Path, static_dir: Path) -> Nginx:
    """nginx serving `static_dir` with sendfile, one worker (like one hub process; see the README)."""
    binary = require_program("nginx", "nginx-light", "/usr/sbin")
    port = free_port()
    # Workers as root: the static files sit in a scratch folder only its owner may enter.
    user = "user root root;" if os.geteuid() == 0 else ""
    config = f"""
{user}
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/temp/client_body;
    proxy_temp_path {root}/temp/proxy;
    fastcgi_temp_path {root}/temp/fastcgi;
    uwsgi_temp_path {root}/temp/uwsgi;
    scgi_temp_path {root}/temp/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    types {{ application/octet-stream tgz; application/json json; }}
    default_type application/octet-stream;
    server {{
        listen {LOOPBACK}:{port};
        root {static_dir};
        location / {{ }}
    }}
}}
"""
    nginx = Nginx(root, config, port, binary=binary)
    try:
        nginx.start(timeout=30)
    except ServiceStartError as exc:
        raise BenchError(f"nginx could not be started: {exc}") from exc
    return nginx


# --- BatleHub ---------------------------------------------------------------------------------------

ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"


@dataclass(frozen=True)
class HubRegistry:
    name: str
    mode: str
    upstreams: tuple[str, ...] = ()
    type: str = "npm"
    policy: str = ""
    """TOML lines of its `[registries.policy]` (tables included), or "" for none."""
    extra: str = ""
    """More TOML lines of the entry: its own keys first, then sub-tables such as
    `[registries.retention]`, `[registries.rbac]` or `[registries.rate_limit]`."""


class BenchHub:
    """One `batlehub serve` (filesystem storage, SQLite, memory cache) with the given registries: the
    test kit's `Hub` process, and the processes that serve its requests (for CPU and RSS)."""

    def __init__(
        self,
        root: Path,
        registries: list[HubRegistry],
        *,
        workers: int = 1,
        label: str = "hub",
        data_dir: Path | None = None,
        env: dict[str, str] | None = None,
        cache: str = 'type = "memory"',
        extra: str = "",
    ) -> None:
        """Config and log go to `root`; data (SQLite, blobs) to `data_dir`, by default `root` too,
        so a second hub can serve the first one's data."""
        self.root = root
        self.data_dir = data_dir or root
        self.label = label
        self.port = free_port()
        self.workers = workers
        self.cache = cache
        self.extra = extra
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "batlehub.toml"
        self.config.write_text(self._config_text(registries))
        self.server = Hub(
            config_path=self.config,
            data_dir=self.data_dir,
            log_path=root / "hub.log",
            port=self.port,
            env=serve_env(env),
        )

    def _config_text(self, registries: list[HubRegistry]) -> str:
        lines = [
            "[server]",
            'host = "127.0.0.1"',
            f"port = {self.port}",
            f"workers = {self.workers}",
            "",
            "[database]",
            'type = "sqlite"',
            "",
            "[cache]",
            self.cache,
            "",
            "[storage]",
            'type = "filesystem"',
            f"path = {json.dumps(str(self.data_dir / 'storage'))}",
            "",
            "[[auth]]",
            'type = "token"',
            "[[auth.tokens]]",
            f'value = "{ADMIN_TOKEN}"',
            'role = "admin"',
            'user_id = "bench"',
            self.extra,
        ]
        for registry in registries:
            lines += ["", "[[registries]]", f'type = "{registry.type}"', f'name = "{registry.name}"']
            lines.append(f'mode = "{registry.mode}"')
            if registry.upstreams:
                lines.append(f"upstreams = {json.dumps(list(registry.upstreams))}")
            if registry.extra:
                lines.append(registry.extra)
            if registry.policy:
                lines.append(registry.policy)
        return "\n".join(lines) + "\n"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def registry_url(self, name: str) -> str:
        return f"{self.url}registries/{name}/"

    @property
    def pid(self) -> int:
        assert self.server.process.proc is not None
        return self.server.process.proc.pid

    def server_pids(self) -> list[int]:
        """The processes that serve requests: the one process, or each worker (not the parent)."""
        if self.workers <= 1:
            return [self.pid]
        # spawn-context workers; skip multiprocessing's resource tracker (it runs `-c ...resource_tracker`).
        workers = []
        for child in child_pids(self.pid):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"resource_tracker" not in cmdline:
                workers.append(child)
        return workers

    def rss(self) -> dict[int, int]:
        return {pid: rss_bytes(pid) for pid in self.server_pids()}

    def start(self, timeout: float = 60) -> None:
        try:
            self.server.start_blocking(timeout_secs=timeout)
        except ServiceStartError as exc:
            raise BenchError(f"the hub ({self.label}) could not be started: {exc}") from exc
        if self.workers > 1:
            deadline = time.monotonic() + timeout
            while len(self.server_pids()) < self.workers and time.monotonic() < deadline:
                time.sleep(0.1)
            # Each worker must be listening before throughput is measured; give the slower one a moment.
            time.sleep(1.0)

    def stop(self) -> None:
        self.server.stop_blocking()
