"""The `hub` fixture: real `batlehub serve` processes for end-to-end tests, and `Hub`, the one
wrapper of such a process that the CLI's tests, the HA harness and the bench start theirs with.

A test writes its config as TOML text and gets a running server on a free port, exactly as an
operator would start it, so what the test sees is what a user sees (CLI, config loading, plugin
discovery, signals, logs). Several hubs may run in one test, e.g. replicas sharing a database:

    async def test_replicas(hub, postgres_url):
        config = f'[database]\\ntype = "postgresql"\\nurl = "{postgres_url}"\\n'
        first, second = await hub(config), await hub(config)
        await first.stop()          # lifecycle methods are coroutines: always await them
        print(second.logs())
"""

from __future__ import annotations

import asyncio
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest

from batlehub.testing.services import (
    LOOPBACK,
    PORT_IN_USE,
    ManagedProcess,
    ServiceStartError,
    free_port,
    log_tail,
)

HEALTH_PATH = "/api/v1/admin/health"
START_TIMEOUT_SECS = 30.0
STOP_TIMEOUT_SECS = 15.0
PORT_ATTEMPTS = 3
WaitFor = Literal["healthy", "port"] | None
"""What starting a hub waits for: health answering 200, any HTTP answer (a backend is down on
purpose), or nothing (the test expects the process to exit)."""


class HubStartError(ServiceStartError):
    """`batlehub serve` exited or did not become healthy; the message ends with its log."""


CLOSED_UPSTREAM = "http://127.0.0.1:9/"
"""Where a test's `batlehub serve` finds the user's npm and pip pointing: a closed port on this
machine (the discard port, nothing listens there), so a config without `[[registries]]` never
proxies a public registry (the clients' own defaults) from a test."""
_CLIENT_INDEX_VARIABLES = (
    "NPM_CONFIG_REGISTRY",
    "npm_config_registry",
    "PIP_INDEX_URL",
    "UV_DEFAULT_INDEX",
    "UV_INDEX_URL",
)


def serve_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a `batlehub serve` started for a test: this process's own without its
    `BATLEHUB_*` variables (a developer's settings must not leak into what a test sees), with npm
    and pip pointing at `CLOSED_UPSTREAM` (the embedded default proxies what they point at), plus
    `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATLEHUB_") and k not in _CLIENT_INDEX_VARIABLES}
    env["NPM_CONFIG_REGISTRY"] = CLOSED_UPSTREAM
    env["PIP_INDEX_URL"] = CLOSED_UPSTREAM + "simple/"
    env.update(overrides or {})
    return env


class Hub:
    """One `batlehub serve` process: its address, data folder, first-start admin token and log.

    Tests with an event loop await `start`, `stop`, `kill` and `restart`; code without one (the
    CLI's tests, the bench) calls `start_blocking` and `stop_blocking`.
    """

    def __init__(
        self,
        *,
        config_path: Path | None,
        data_dir: Path | None,
        log_path: Path,
        port: int,
        env: Mapping[str, str],
        command: Sequence[str] | None = None,
    ) -> None:
        """`port` is where the hub is reached; `config_path` or `env` must make it listen there.
        `data_dir` None passes no `--data-dir`, so the hub picks its default folder as it does for an
        operator. `command` runs batlehub (default: `-m batlehub` with this interpreter), e.g. the
        installed console script."""
        self.config_path = config_path
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = port
        self.admin_token: str | None = None
        argv = [*(command or [sys.executable, "-m", "batlehub"]), "serve"]
        if data_dir is not None:
            argv += ["--data-dir", str(data_dir)]
        if config_path is not None:
            argv += ["--config", str(config_path)]
        self.process = ManagedProcess(argv, log_path, env=dict(env), cwd=(data_dir or log_path).parent)

    @property
    def url(self) -> str:
        """Base URL, without a trailing slash."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def admin_headers(self) -> dict[str, str]:
        """`Authorization` header carrying the first-start admin token."""
        if not self.admin_token:
            where = self.data_dir / "admin.token" if self.data_dir is not None else "the default data folder's token"
            raise RuntimeError(f"no admin token: {where} was not written")
        return {"Authorization": f"Bearer {self.admin_token}"}

    @property
    def running(self) -> bool:
        return self.process.running

    def logs(self) -> str:
        """Everything the server wrote to stdout and stderr so far (all starts of this hub)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def start(self, *, wait_for: WaitFor = "healthy", timeout_secs: float = START_TIMEOUT_SECS) -> None:
        """Start the process; `wait_for` is "healthy" (health answers 200), "port" (accepts
        connections, e.g. when a backend is deliberately down) or None (don't wait)."""
        self.process.start()
        if wait_for is None:
            return
        await self._wait_ready(wait_for, timeout_secs)
        self._read_admin_token()

    def start_blocking(self, *, wait_for: WaitFor = "healthy", timeout_secs: float = START_TIMEOUT_SECS) -> None:
        """`start` for callers without an event loop; the same `wait_for`, the same errors."""
        self.process.start()
        if wait_for is None:
            return
        _check_wait_for(wait_for)
        deadline = time.monotonic() + timeout_secs
        last = "no answer yet"
        while True:
            if not self.process.running:
                raise HubStartError(self._failure(f"exited with code {self.process.returncode}"))
            try:
                status, body = _get(self.url + HEALTH_PATH)
                if wait_for == "port" or status == 200:
                    break
                last = f"{HEALTH_PATH} answered {status}: {body[:500]}"
            except (OSError, http.client.HTTPException) as exc:
                last = f"{HEALTH_PATH}: {exc!r}"
            if time.monotonic() > deadline:
                self.stop_blocking()
                raise HubStartError(self._failure(f"not {wait_for} after {timeout_secs:.0f}s ({last})"))
            time.sleep(0.1)
        self._read_admin_token()

    def _read_admin_token(self) -> None:
        token_file = self.data_dir / "admin.token" if self.data_dir is not None else None
        if token_file is not None and token_file.exists():
            self.admin_token = token_file.read_text().strip()

    async def _wait_ready(self, wait_for: WaitFor, timeout_secs: float) -> None:
        _check_wait_for(wait_for)
        deadline = time.monotonic() + timeout_secs
        last = "no answer yet"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while True:
                if not self.process.running:
                    raise HubStartError(self._failure(f"exited with code {self.process.returncode}"))
                try:
                    async with session.get(self.url + HEALTH_PATH) as response:
                        body = await response.text()
                        if wait_for == "port" or response.status == 200:
                            return
                        last = f"{HEALTH_PATH} answered {response.status}: {body[:500]}"
                except (TimeoutError, aiohttp.ClientError) as exc:
                    last = f"{HEALTH_PATH}: {exc!r}"
                if time.monotonic() > deadline:
                    await self.stop()
                    raise HubStartError(self._failure(f"not {wait_for} after {timeout_secs:.0f}s ({last})"))
                await asyncio.sleep(0.1)

    def _failure(self, reason: str) -> str:
        return f"batlehub serve on port {self.port}: {reason}\n--- last lines of {self.log_path} ---\n" + log_tail(
            self.log_path, 60
        )

    async def stop(self, timeout_secs: float = STOP_TIMEOUT_SECS) -> None:
        """Graceful stop: SIGTERM, then SIGKILL if it has not exited after `timeout_secs`."""
        await asyncio.to_thread(self.stop_blocking, timeout_secs)

    def stop_blocking(self, timeout_secs: float = STOP_TIMEOUT_SECS) -> None:
        """`stop` for callers without an event loop."""
        self.process.stop(timeout_secs)

    async def kill(self) -> None:
        """SIGKILL: a crash, as far as clients and the database can tell."""
        await asyncio.to_thread(self.process.kill)

    async def restart(self, *, wait_for: WaitFor = "healthy", timeout_secs: float = START_TIMEOUT_SECS) -> None:
        """Stop gracefully and start again on the same port, config, data folder and environment."""
        await self.stop()
        await self.start(wait_for=wait_for, timeout_secs=timeout_secs)

    async def wait_exit(self, timeout_secs: float = START_TIMEOUT_SECS) -> int:
        """Wait for the process to exit by itself (e.g. a bad config) and return its exit code."""
        assert self.process.proc is not None, "hub was never started"
        deadline = time.monotonic() + timeout_secs
        while (code := self.process.returncode) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(self._failure(f"still running after {timeout_secs:.0f}s"))
            await asyncio.sleep(0.05)
        return code

    def __repr__(self) -> str:
        return f"<Hub {self.url} data_dir={self.data_dir}>"


def _check_wait_for(wait_for: WaitFor) -> None:
    if wait_for not in ("healthy", "port"):
        raise ValueError(f'wait_for must be "healthy", "port" or None, not {wait_for!r}')


# Straight to the hub, as the async path's aiohttp does: a proxy set in the environment would
# answer for a hub that is not up.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> tuple[int, str]:
    try:
        with _DIRECT.open(url, timeout=5) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


class HubFactory:
    """Call with TOML text to start a hub: `await hub(config, env={...})`."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.hubs: list[Hub] = []

    async def __call__(
        self,
        config: str | None = "",
        *,
        env: Mapping[str, str] | None = None,
        data_dir: Path | str | None = None,
        port: int | None = None,
        wait_for: WaitFor = "healthy",
        timeout_secs: float = START_TIMEOUT_SECS,
        command: Sequence[str] | None = None,
    ) -> Hub:
        """Start `batlehub serve` with `config` (TOML text; None = no --config, the embedded default).

        `env` adds environment variables (e.g. `BATLEHUB_...` overrides); the test runner's own
        `BATLEHUB_*` variables are not passed on. `data_dir` lets replicas share a folder; by default
        each hub has its own. `port` picks the port (e.g. when the config must know its own URL).
        `command` runs batlehub another way (see `Hub`), e.g. inside a sandbox.
        """
        folder = self.base_dir / f"hub{len(self.hubs)}"
        folder.mkdir(parents=True, exist_ok=True)
        config_path = None
        if config is not None:
            config_path = folder / "batlehub.toml"
            config_path.write_text(config)
        data = Path(data_dir) if data_dir is not None else folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        base_env = serve_env({"PYTHONUNBUFFERED": "1", "BATLEHUB_SERVER__HOST": LOOPBACK})
        chosen = port is not None or "BATLEHUB_SERVER__PORT" in (env or {})
        for attempt in range(1, PORT_ATTEMPTS + 1):
            hub_port = port or free_port()
            process_env = {
                **base_env,
                "BATLEHUB_SERVER__PORT": str(hub_port),
                # A config without [[registries]] proxies the registries the npm and pip clients
                # are configured with; a test hub must not reach one outside this machine: by
                # default it is the hub itself, which it detects and proxies nothing (a test can
                # pass its own).
                "NPM_CONFIG_REGISTRY": f"http://{LOOPBACK}:{hub_port}/registries/npm/",
                "PIP_INDEX_URL": f"http://{LOOPBACK}:{hub_port}/registries/pypi/simple/",
                **(env or {}),
            }
            if "BATLEHUB_SERVER__PORT" in (env or {}):
                hub_port = int(process_env["BATLEHUB_SERVER__PORT"])
            hub = Hub(
                config_path=config_path,
                data_dir=data,
                log_path=folder / "hub.log",
                port=hub_port,
                env=process_env,
                command=command,
            )
            self.hubs.append(hub)
            try:
                await hub.start(wait_for=wait_for, timeout_secs=timeout_secs)
            except HubStartError as exc:
                # Another process may have taken the free port before the hub bound it.
                if chosen or attempt == PORT_ATTEMPTS or not PORT_IN_USE.search(str(exc)):
                    raise
                continue
            return hub
        raise AssertionError("unreachable")

    def stop_all(self) -> None:
        for hub in self.hubs:
            hub.stop_blocking()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubFactory]:
    """Factory of real `batlehub serve` processes; all are stopped after the test."""
    factory = HubFactory(tmp_path / "hubs")
    try:
        yield factory
    finally:
        factory.stop_all()


def token_auth_toml(tokens: Mapping[str, tuple[str, str]]) -> str:
    """An `[[auth]]` block for a test config: user id -> (token, role)."""
    lines = ["[[auth]]", 'type = "token"']
    for user_id, (token, role) in tokens.items():
        lines += ["[[auth.tokens]]", f'value = "{token}"', f'role = "{role}"', f'user_id = "{user_id}"']
    return "\n".join(lines) + "\n"


def shared_backends_toml(postgres_url: str, redis_url: str, s3: Mapping[str, Any], prefix: str) -> str:
    """`[database]`, `[cache]` and `[storage]` for replicas sharing PostgreSQL, Redis and an S3
    bucket (`s3`: the `s3_config` fixture), with `prefix` keeping this test's keys and objects
    apart from the session's other users of the same Redis and bucket."""
    return f"""
[database]
type = "postgresql"
url = "{postgres_url}"

[cache]
type = "redis"
url = "{redis_url}"
prefix = "{prefix}:"

[storage]
type = "s3"
endpoint = "{s3["endpoint"]}"
region = "{s3["region"]}"
bucket = "{s3["bucket"]}"
access_key_id = "{s3["access_key_id"]}"
secret_access_key = "{s3["secret_access_key"]}"
force_path_style = true
prefix = "{prefix}"
"""
