"""Several BatleHub replicas behind nginx, sharing PostgreSQL, Redis and S3, with an npm upstream.

The same layout as `deploy/docker-compose.ha.yml`, on one machine without containers: each replica
is a real `batlehub serve` process on a free loopback port, and nginx runs in the foreground with
its own prefix folder and a copy of `deploy/nginx.conf` whose upstream lists those ports. Tests use
`HaCluster` to restart, replace and kill replicas; as a script it starts everything (the backing
services too, unless `BATLEHUB_TEST_*` variables name running ones) and keeps it up until Ctrl-C:

    python -m batlehub_npm_testing.ha --replicas 3

It prints the URL of nginx, of each replica, and an admin and a user token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from batlehub.testing.hub import HEALTH_PATH, Hub, HubStartError, WaitFor, serve_env
from batlehub.testing.nginx import Nginx
from batlehub.testing.services import LOOPBACK, ServiceStartError, free_port, log_tail

REGISTRY = "npm"
"""Name of the npm registry every replica serves (at `/registries/npm/`)."""


@dataclass(frozen=True)
class HaServices:
    """The shared backing services: where the replicas' database, cache, storage and upstream are."""

    database_url: str
    redis_url: str
    s3: Mapping[str, Any]
    upstream_url: str
    """An npm registry (Verdaccio in tests): the registry's only upstream."""


def _toml(value: Any) -> str:
    """A TOML value: JSON's strings, numbers, booleans and arrays are valid TOML."""
    return json.dumps(value)


@dataclass
class HaOptions:
    """What a cluster's replicas are configured with, beyond the shared services."""

    cache: str = "redis"
    """The cache type: redis, postgres or memory."""
    storage: str = "s3"
    """The storage type: s3, or filesystem (a folder per replica, like a local disk)."""
    mode: str = "hybrid"
    metadata_ttl_secs: float = 300
    warm_packages: Sequence[str] = ()
    shutdown_timeout_secs: float = 30
    sweep_interval_secs: float | None = None
    sweep_grace_secs: float | None = None
    max_artifact_size_bytes: int | None = None
    extra_toml: str = ""
    env: Mapping[str, str] = field(default_factory=dict)


class HaCluster:
    """N replicas behind nginx. `url` is nginx; `replicas[i].url` reaches replica i directly."""

    def __init__(
        self, base_dir: Path, services: HaServices, replicas: int = 3, options: HaOptions | None = None
    ) -> None:
        self.base_dir = base_dir
        self.services = services
        self.options = options or HaOptions()
        self.name = f"ha{uuid.uuid4().hex[:8]}"
        """Prefix of this cluster's keys in the shared Redis and S3 bucket."""
        self.admin_token = secrets.token_hex(16)
        self.user_token = secrets.token_hex(16)
        self.user_id = "alice"
        self.ports = [free_port() for _ in range(replicas)]
        self.replicas: list[Hub] = []
        self.generations = [0] * replicas
        self.nginx = Nginx.in_front_of(base_dir / "nginx", self.ports)

    # --- configuration --------------------------------------------------------------------------

    def config_text(self, index: int) -> str:
        """The TOML a replica starts with (the same for all but the filesystem storage folder)."""
        o, s = self.options, self.services
        lines = [
            "[server]",
            f"trusted_proxies = {_toml([f'{LOOPBACK}/32'])}",
            f"shutdown_timeout_secs = {_toml(o.shutdown_timeout_secs)}",
            "",
            "[database]",
            'type = "postgresql"',
            f"url = {_toml(s.database_url)}",
            "max_connections = 10",
            "",
            "[cache]",
            f"type = {_toml(o.cache)}",
        ]
        if o.cache == "redis":
            lines += [f"url = {_toml(s.redis_url)}", f"prefix = {_toml(self.name + ':')}"]
        lines += ["", "[storage]", f"type = {_toml(o.storage)}"]
        if o.storage == "s3":
            for key in ("endpoint", "region", "bucket", "access_key_id", "secret_access_key", "force_path_style"):
                lines.append(f"{key} = {_toml(s.s3[key])}")
            lines.append(f"prefix = {_toml(self.name)}")
        else:
            lines.append(f"path = {_toml(str(self.base_dir / f'replica{index}' / 'storage'))}")
        if o.max_artifact_size_bytes:
            lines += ["", "[limits]", f"max_artifact_size_bytes = {o.max_artifact_size_bytes}"]
        if o.sweep_interval_secs is not None or o.sweep_grace_secs is not None:
            lines += ["", "[sweep]"]
            if o.sweep_interval_secs is not None:
                lines.append(f"interval_secs = {_toml(o.sweep_interval_secs)}")
            if o.sweep_grace_secs is not None:
                lines.append(f"grace_secs = {_toml(o.sweep_grace_secs)}")
        lines += [
            "",
            "[[auth]]",
            'type = "token"',
            "[[auth.tokens]]",
            f"value = {_toml(self.admin_token)}",
            'role = "admin"',
            'user_id = "admin"',
            "[[auth.tokens]]",
            f"value = {_toml(self.user_token)}",
            'role = "user"',
            f"user_id = {_toml(self.user_id)}",
            "",
            "[[registries]]",
            'type = "npm"',
            f"name = {_toml(REGISTRY)}",
            f"mode = {_toml(o.mode)}",
            f"upstreams = {_toml([s.upstream_url])}",
            "[registries.cache]",
            f"metadata_ttl_secs = {_toml(o.metadata_ttl_secs)}",
            f"warm_packages = {_toml(list(o.warm_packages))}",
            "",
            o.extra_toml,
        ]
        return "\n".join(lines) + "\n"

    @property
    def url(self) -> str:
        """nginx's base URL (no trailing slash): what clients use."""
        return self.nginx.url

    @property
    def registry_url(self) -> str:
        """The npm registry through nginx, with the trailing slash npm expects."""
        return f"{self.url}/registries/{REGISTRY}/"

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.user_token}"}

    @property
    def admin_headers(self) -> dict[str, str]:
        return self.auth(self.admin_token)

    # --- replicas -------------------------------------------------------------------------------

    def _new_hub(self, index: int) -> Hub:
        folder = self.base_dir / f"replica{index}"
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "batlehub.toml"
        config.write_text(self.config_text(index))
        data = folder / "data"
        data.mkdir(exist_ok=True)
        generation = self.generations[index]
        self.generations[index] += 1
        env = serve_env(
            {
                "PYTHONUNBUFFERED": "1",
                "BATLEHUB_SERVER__HOST": LOOPBACK,
                "BATLEHUB_SERVER__PORT": str(self.ports[index]),
                **self.options.env,
            }
        )
        return Hub(
            config_path=config,
            data_dir=data,
            log_path=folder / f"hub.{generation}.log",
            port=self.ports[index],
            env=env,
        )

    async def start_replica(self, index: int, *, wait_for: WaitFor = "healthy", timeout_secs: float = 60) -> Hub:
        """Start a new process for replica `index` on its port (replacing a stopped one)."""
        hub = self._new_hub(index)
        if index < len(self.replicas):
            self.replicas[index] = hub
        else:
            self.replicas.append(hub)
        await hub.start(wait_for=wait_for, timeout_secs=timeout_secs)
        return hub

    async def start(self, *, wait_for: WaitFor = "healthy", timeout_secs: float = 60) -> None:
        """Start every replica at once (as a deploy of a fresh cluster would), then nginx."""
        self.replicas = [self._new_hub(i) for i in range(len(self.ports))]
        await asyncio.gather(*(h.start(wait_for=wait_for, timeout_secs=timeout_secs) for h in self.replicas))
        await asyncio.to_thread(self.nginx.start)

    async def replace(self, index: int, *, stop_timeout_secs: float | None = None) -> tuple[float, float]:
        """A rolling-restart step: SIGTERM replica `index`, wait for it to drain and exit, start a
        new process in its place and wait until it is healthy, then until nginx routes to it
        again. Returns (drain secs, start secs).

        nginx's passive health skips a replica for `fail_timeout` after a refused connection: a
        step that took the next replica down sooner could leave nginx with none it believes in."""
        old = self.replicas[index]
        began = time.monotonic()
        timeout = stop_timeout_secs if stop_timeout_secs is not None else self.options.shutdown_timeout_secs + 15
        await old.stop(timeout)
        code = old.process.returncode
        if code != 0:
            raise HubStartError(f"replica {index} exited with {code} on SIGTERM:\n{log_tail(old.log_path, 60)}")
        drained = time.monotonic()
        await self.start_replica(index)
        started = time.monotonic()
        await asyncio.sleep(self.nginx.fail_timeout_secs)
        return drained - began, started - drained

    async def kill(self, index: int) -> None:
        """SIGKILL replica `index` (a crash)."""
        await self.replicas[index].kill()

    async def stop(self) -> None:
        await asyncio.to_thread(self.nginx.stop)
        await asyncio.gather(*(h.stop() for h in self.replicas), return_exceptions=True)

    async def health(self, index: int) -> tuple[int, dict[str, Any]]:
        """Status and body of replica `index`'s health endpoint, asked directly."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(self.replicas[index].url + HEALTH_PATH) as response,
        ):
            return response.status, await response.json(content_type=None)

    def logs(self) -> str:
        """Every replica log (all generations) and nginx's error log, for failure messages."""
        parts = []
        for path in sorted(self.base_dir.glob("replica*/hub.*.log")):
            parts.append(f"--- {path.relative_to(self.base_dir)} ---\n{log_tail(path, 40)}")
        try:
            errors = [line for line in self.nginx.error_log.read_text().splitlines() if "[notice]" not in line]
        except OSError:
            errors = []
        parts.append("--- nginx error.log (without notices) ---\n" + "\n".join(errors[-40:]))
        return "\n".join(parts)

    def describe(self) -> str:
        lines = [f"nginx:        {self.url}", f"npm registry: {self.registry_url}"]
        lines += [f"replica {i}:    {h.url}  (log: {h.log_path})" for i, h in enumerate(self.replicas)]
        lines += [
            f"admin token:  {self.admin_token}",
            f"user token:   {self.user_token}  (user {self.user_id})",
            f"upstream:     {self.services.upstream_url}",
            f"folder:       {self.base_dir}",
        ]
        return "\n".join(lines)


# --- the script -----------------------------------------------------------------------------------


def _start_services(root: Path, stack: contextlib.ExitStack) -> HaServices:
    """Backing services from BATLEHUB_TEST_* variables, or local throwaway ones."""
    from batlehub.testing import services as svc
    from batlehub_npm_testing.services import VerdaccioServer, install_node_tools

    env = os.environ
    if env.get("BATLEHUB_TEST_POSTGRES_URL"):
        database_url = env["BATLEHUB_TEST_POSTGRES_URL"]
    else:
        cluster = svc.PostgresCluster()
        stack.callback(cluster.destroy)
        cluster.start()
        database_url = cluster.url
    if env.get("BATLEHUB_TEST_REDIS_URL"):
        redis_url = env["BATLEHUB_TEST_REDIS_URL"]
    else:
        (root / "redis").mkdir(parents=True, exist_ok=True)
        redis = svc.RedisServer(root / "redis")
        stack.callback(redis.process.stop)
        redis.start()
        redis_url = redis.url
    if env.get("BATLEHUB_TEST_S3_ENDPOINT"):
        s3 = {
            "endpoint": env["BATLEHUB_TEST_S3_ENDPOINT"],
            "region": env.get("BATLEHUB_TEST_S3_REGION", "us-east-1"),
            "bucket": env["BATLEHUB_TEST_S3_BUCKET"],
            "access_key_id": env["BATLEHUB_TEST_S3_ACCESS_KEY"],
            "secret_access_key": env["BATLEHUB_TEST_S3_SECRET_KEY"],
            "force_path_style": True,
        }
    else:
        weed = svc.SeaweedFS(root / "s3")
        stack.callback(weed.process.stop)
        weed.start()
        s3 = weed.config
    if env.get("BATLEHUB_TEST_VERDACCIO_URL"):
        upstream = env["BATLEHUB_TEST_VERDACCIO_URL"]
    else:
        (root / "verdaccio").mkdir(parents=True, exist_ok=True)
        verdaccio = VerdaccioServer(install_node_tools(), root / "verdaccio")
        stack.callback(verdaccio.process.stop)
        verdaccio.start()
        upstream = verdaccio.url
    return HaServices(database_url=database_url, redis_url=redis_url, s3=s3, upstream_url=upstream)


async def _run(replicas: int, root: Path, services: HaServices) -> None:
    cluster = HaCluster(root / "cluster", services, replicas)
    try:
        await cluster.start()
        print(cluster.describe(), flush=True)
        print("\nRunning; press Ctrl-C to stop.", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        print("stopping...", flush=True)
        await cluster.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batlehub_npm_testing.ha",
        description="Run N BatleHub replicas behind nginx with PostgreSQL, Redis, SeaweedFS S3 and a "
        "Verdaccio upstream on this machine, until Ctrl-C. BATLEHUB_TEST_POSTGRES_URL, _REDIS_URL, "
        "_S3_ENDPOINT (+ _S3_ACCESS_KEY, _S3_SECRET_KEY, _S3_BUCKET) and _VERDACCIO_URL use running "
        "services instead of starting them.",
    )
    parser.add_argument("--replicas", type=int, default=3, help="number of hub replicas (default: 3)")
    parser.add_argument("--dir", help="folder for logs and data (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="batlehub-ha-"))
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    with contextlib.ExitStack() as stack:
        try:
            services = _start_services(root, stack)
            asyncio.run(_run(args.replicas, root, services))
        except ServiceStartError as exc:
            print(f"ha: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
