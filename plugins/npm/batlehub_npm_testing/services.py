"""Verdaccio and the JavaScript package clients for npm's end-to-end tests.

`node_tools` installs pinned Verdaccio, pnpm and yarn next to the system node and npm once per
checkout; `verdaccio` is a session registry with no uplinks, the offline upstream the npm plugin's
proxy tests fetch from. Both are built from `batlehub.testing.services` (processes, free ports, the
restart-after-a-fault-test machinery), so they behave like the core's PostgreSQL, Redis and S3:

    BATLEHUB_TEST_VERDACCIO_URL    http://host:port/, with BATLEHUB_TEST_VERDACCIO_TOKEN

names a running Verdaccio instead (its fault tests and request log checks skip then), and
`BATLEHUB_TEST_NODE_DIR` moves the node tools' install folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from batlehub.testing.services import (
    LOOPBACK,
    ManagedProcess,
    ServiceStartError,
    _ChildService,
    _ExternalService,
    _session_service,
    free_port,
    scratch_dir,
    wait_until,
)
from batlehub_npm_testing.clients import publish_package

# The project checkout when batlehub-npm is installed editable from it (the normal case for running
# tests): the tools then live in its git-ignored `.services/node` and survive a new venv.
_REPO_ROOT = Path(__file__).resolve().parents[3]
NODE_TOOL_VERSIONS = {"verdaccio": "6.8.0", "pnpm": "12.21.0", "yarn": "1.22.22"}
"""Pinned because Verdaccio 6.8.0 is the last release that runs on node 20, and a lockstep pin makes
client behaviour reproducible between a laptop and CI."""


def _http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@dataclass(frozen=True)
class NodeTools:
    """Paths of the JavaScript package clients and of Verdaccio, installed once per checkout."""

    node: str
    npm: str
    pnpm: str
    yarn: str
    verdaccio: str
    root: Path


def node_tools_dir() -> Path:
    override = os.environ.get("BATLEHUB_TEST_NODE_DIR")
    if override:
        return Path(override)
    if (_REPO_ROOT / "plugins" / "npm" / "pyproject.toml").exists():
        return _REPO_ROOT / ".services" / "node"
    return Path.home() / ".cache" / "batlehub" / "node"


def install_node_tools(root: Path | None = None) -> NodeTools:
    """Install Verdaccio, pnpm and yarn (classic) into `root` unless the same versions are there.

    A file lock serialises concurrent test runs; a stamp file records what was installed, so a
    half-finished install is redone rather than trusted.
    """
    root = root or node_tools_dir()
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise ServiceStartError("node and npm (node 20 or newer) must be on PATH for the npm client tests")
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": "batlehub-test-node-tools",
        "version": "0.0.0",
        "private": True,
        "dependencies": NODE_TOOL_VERSIONS,
        # verdaccio-audit asks for a node-fetch dist-tag that some registry mirrors lack.
        "overrides": {"verdaccio-audit": {"node-fetch": "2.7.0"}},
    }
    wanted = json.dumps(manifest, sort_keys=True)
    bin_dir = root / "node_modules" / ".bin"
    tools = NodeTools(
        node=node,
        npm=npm,
        pnpm=str(bin_dir / "pnpm"),
        yarn=str(bin_dir / "yarn"),
        verdaccio=str(bin_dir / "verdaccio"),
        root=root,
    )
    stamp = root / ".installed"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == wanted:
            return tools
        stamp.unlink(missing_ok=True)
        (root / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.lower().startswith("npm_config_userconfig")}
        result = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "--no-update-notifier"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode != 0:
            raise ServiceStartError(
                f"`npm install` of {NODE_TOOL_VERSIONS} in {root} failed ({result.returncode}):\n"
                f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        for path in (tools.pnpm, tools.yarn, tools.verdaccio):
            if not Path(path).exists():
                raise ServiceStartError(f"`npm install` in {root} finished but {path} is missing")
        stamp.write_text(wanted)
    return tools


@pytest.fixture(scope="session")
def node_tools() -> NodeTools:
    """npm (the system one), pnpm, yarn classic and Verdaccio, installed on first use."""
    return install_node_tools()


@dataclass(frozen=True)
class RegistryRequest:
    """One request Verdaccio received, from its JSON log."""

    method: str
    path: str


class VerdaccioServer(_ChildService):
    """A real npm registry with no uplinks: the offline upstream for the npm plugin's tests."""

    def __init__(self, tools: NodeTools, root: Path) -> None:
        self.tools = tools
        self.root = root
        self.port = free_port()
        self.config_path = root / "config.yaml"
        self.request_log_path = root / "requests.jsonl"
        self.log = root / "verdaccio.log"
        self.token = ""
        self.stopped_by_test = False
        self._write_config()
        env = {**os.environ, "NODE_ENV": "production"}
        argv = [tools.node, tools.verdaccio, "--config", str(self.config_path)]
        self.process = ManagedProcess(argv, self.log, env=env, cwd=root)

    @property
    def url(self) -> str:
        """Registry URL, with the trailing slash npm expects."""
        return f"http://{LOOPBACK}:{self.port}/"

    def _write_config(self) -> None:
        # JSON is valid YAML, which avoids depending on a YAML writer.
        config = {
            "storage": str(self.root / "storage"),
            "auth": {"htpasswd": {"file": str(self.root / "htpasswd"), "max_users": 1000}},
            "uplinks": {},
            "packages": {"**": {"access": "$all", "publish": "$authenticated", "unpublish": "$authenticated"}},
            "listen": f"{LOOPBACK}:{self.port}",
            "web": {"enable": False},
            "server": {"keepAliveTimeout": 60},
            "max_body_size": "200mb",
            "log": {"type": "file", "path": str(self.request_log_path), "format": "json", "level": "http"},
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self) -> None:
        """Start (again) on the same port and storage: published packages survive a restart."""
        self.process.start()
        wait_until(
            lambda: _http_status(self.url + "-/ping") == 200,
            what="Verdaccio",
            process=self.process,
            log=self.log,
        )
        if not self.token:
            self.token = self.create_user("batlehub-test", uuid.uuid4().hex)
        self.stopped_by_test = False

    def create_user(self, name: str, password: str) -> str:
        """Register a user the way `npm adduser` does and return its bearer token."""
        body = {
            "name": name,
            "password": password,
            "email": f"{name}@example.invalid",
            "type": "user",
            "roles": [],
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        request = urllib.request.Request(
            f"{self.url}-/user/org.couchdb.user:{urllib.parse.quote(name)}",
            data=json.dumps(body).encode(),
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.load(response)["token"])

    def publish(
        self, package_dir: Path | str, *, tag: str | None = None, token: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`npm publish` a package folder with the real npm CLI; raises with npm's output on failure."""
        with tempfile.TemporaryDirectory(prefix="npm-publish-") as scratch:
            return publish_package(
                package_dir, self.url, token or self.token, scratch=scratch, npm=self.tools.npm, tag=tag
            )

    def packument(self, name: str) -> dict[str, Any]:
        """The package document as Verdaccio serves it (for assertions)."""
        quoted = name.replace("/", "%2f")
        with urllib.request.urlopen(f"{self.url}{quoted}", timeout=10) as response:
            return dict(json.load(response))

    def request_log(self, settle: float = 0.2) -> list[RegistryRequest]:
        """Every request Verdaccio received so far, in order (e.g. to count upstream fetches).

        Verdaccio writes its log asynchronously, so this waits until the file stops growing for
        `settle` seconds (at most two seconds) before reading.
        """
        deadline = time.monotonic() + 2.0
        size = -1
        while time.monotonic() < deadline:
            current = self.request_log_path.stat().st_size if self.request_log_path.exists() else 0
            if current == size:
                break
            size = current
            time.sleep(settle)
        requests: list[RegistryRequest] = []
        if not self.request_log_path.exists():
            return requests
        for line in self.request_log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                req = entry.get("req")
                if isinstance(req, dict) and "method" in req and "url" in req:
                    requests.append(RegistryRequest(str(req["method"]), str(req["url"])))
        return requests

    def request_count(self, path: str | re.Pattern[str] | None = None, method: str | None = "GET") -> int:
        """How many requests matched: `path` is an exact path (query included) or a regex."""

        def matches(r: RegistryRequest) -> bool:
            if method is not None and r.method != method:
                return False
            if path is None:
                return True
            if isinstance(path, re.Pattern):
                return path.search(r.path) is not None
            return r.path == path

        return sum(1 for r in self.request_log() if matches(r))


class _ExternalVerdaccio(_ExternalService):
    def __init__(self, url: str, token: str, tools: NodeTools) -> None:
        super().__init__(url if url.endswith("/") else url + "/", "BATLEHUB_TEST_VERDACCIO_URL")
        self.token = token
        self.tools = tools

    def publish(
        self, package_dir: Path | str, *, tag: str | None = None, token: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        with tempfile.TemporaryDirectory(prefix="npm-publish-") as scratch:
            return publish_package(
                package_dir, self.url, token or self.token, scratch=scratch, npm=self.tools.npm, tag=tag
            )

    def request_log(self, settle: float = 0.2) -> list[RegistryRequest]:
        pytest.skip("the request log of an external Verdaccio is not readable")

    def request_count(self, path: str | re.Pattern[str] | None = None, method: str | None = "GET") -> int:
        pytest.skip("the request log of an external Verdaccio is not readable")


@pytest.fixture(scope="session")
def verdaccio(node_tools: NodeTools) -> Iterator[VerdaccioServer | _ExternalService]:
    """A Verdaccio registry: `.url` (trailing slash), `.token` of a user who may publish,
    `.publish(dir)`, `.packument(name)`, `.request_log()`, `.request_count(path)`, `.stop()`, `.start()`.
    """
    external = os.environ.get("BATLEHUB_TEST_VERDACCIO_URL")
    if external:
        yield _ExternalVerdaccio(external, os.environ.get("BATLEHUB_TEST_VERDACCIO_TOKEN", ""), node_tools)
        return
    yield from _session_service(lambda: VerdaccioServer(node_tools, scratch_dir("verdaccio")))
