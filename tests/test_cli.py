"""The `batlehub` command line, run as an operator runs it (a real subprocess): help, check-config,
migrate, plugins, and serve with the embedded default and a graceful SIGTERM."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from batlehub.db import MIGRATIONS
from batlehub.testing.hub import Hub, serve_env
from batlehub.testing.services import free_port

LATEST = MIGRATIONS[-1][0]


def batlehub_command() -> list[str]:
    """The installed console script if there is one next to this interpreter, else `-m batlehub`."""
    script = Path(sys.executable).parent / "batlehub"
    if script.exists():
        return [str(script)]
    found = shutil.which("batlehub")
    return [found] if found else [sys.executable, "-m", "batlehub"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a clean shell: no BATLEHUB_* of the developer's, only the built-in
    plugins (so installed third-party plugins don't change the output), data under tmp_path."""
    return serve_env(
        {
            "BATLEHUB_DISABLE_PLUGIN_AUTOLOAD": "1",
            "XDG_DATA_HOME": str(tmp_path / "xdg"),
            # What the embedded default would proxy: nothing outside this machine in a test.
            "NPM_CONFIG_REGISTRY": "http://127.0.0.1:9/",
            "PIP_INDEX_URL": "http://127.0.0.1:9/simple/",
        }
    )


def run(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(batlehub_command() + args, capture_output=True, text=True, timeout=60, env=env, cwd=cwd)


# --- help and plugins ------------------------------------------------------------------------------------


def test_help(env: dict[str, str]) -> None:
    result = run(["--help"], env)
    assert result.returncode == 0
    for command in ("serve", "migrate", "check-config", "plugins"):
        assert command in result.stdout
    assert "BATLEHUB_SERVER__PORT" in result.stdout


def test_every_subcommand_has_help(env: dict[str, str]) -> None:
    commands = ["serve", "migrate", "check-config", "plugins"]
    running = {  # in parallel: each is a fresh interpreter
        command: subprocess.Popen(
            [*batlehub_command(), command, "--help"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for command in commands
    }
    for command, proc in running.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.startswith(f"usage: batlehub {command}")
        if command != "plugins":
            assert "--config" in out


def test_no_command_is_a_usage_error(env: dict[str, str]) -> None:
    result = run([], env)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_version(env: dict[str, str]) -> None:
    result = run(["--version"], env)
    assert result.returncode == 0
    assert result.stdout.startswith("batlehub ")


def test_plugins_lists_the_builtins_with_versions(env: dict[str, str]) -> None:
    from batlehub import __version__

    result = run(["plugins"], env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name, provides in (
        ("batlehub.builtin.cache_memory", "cache:memory"),
        ("batlehub.builtin.cache_postgres", "cache:postgres"),
        ("batlehub.builtin.storage_filesystem", "storage:filesystem"),
    ):
        assert f"{name}  [batlehub {__version__}]" in out
        assert f"provides: {provides}" in out
    assert "hooks: register_cache_backends" in out


def test_plugins_lists_installed_distributions(env: dict[str, str]) -> None:
    """Entry points of the `batlehub` group show up with their own distribution and version."""
    pytest.importorskip("batlehub_npm", reason="needs an installed plugin distribution")
    from importlib.metadata import version

    autoload = {k: v for k, v in env.items() if k != "BATLEHUB_DISABLE_PLUGIN_AUTOLOAD"}
    result = run(["plugins"], autoload)
    assert result.returncode == 0, result.stderr
    assert f"npm  [batlehub-npm {version('batlehub-npm')}]" in result.stdout
    assert "provides: registry:npm" in result.stdout
    assert "npm  [" not in run(["plugins"], env).stdout  # BATLEHUB_DISABLE_PLUGIN_AUTOLOAD=1


# --- check-config -------------------------------------------------------------------------------------


def test_check_config_lists_every_problem(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[server]\nport = "abc"\ncolour = "blue"\n'
        "[limits]\nmax_artifact_size_bytes = -1\n"
        '[[registries]]\ntype = "npm"\nname = "npm"\n'
        '[[registries]]\ntype = "npm"\nname = "npm"\n'
        "[nonsense]\nx = 1\n"
        '[storage]\ntype = "gcs"\n'
    )
    result = run(["check-config", "--config", str(config)], env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    # The core's problems and the plugins' (here: nothing provides gcs storage or npm registries,
    # autoload being off) in one run, so the operator fixes the file in one go.
    assert lines[0] == "batlehub: configuration has 8 problem(s):"
    problems = sorted(line.strip() for line in lines[1:])
    assert [p.split(":", 1)[0].split(" ", 1)[0] for p in problems] == [
        "[registries[0]]",
        "[registries[1]]",
        "[storage]",
        "limits.max_artifact_size_bytes",
        "nonsense",
        "registries[1].name",
        "server.colour",
        "server.port",
    ]
    assert '  server.port: expected an integer, got "abc"' in lines


def test_check_config_lists_core_and_backend_problems_together(env: dict[str, str], tmp_path: Path) -> None:
    """The backends' own keys are validated by their config models even when the core settings
    have problems, so one run shows everything."""
    config = tmp_path / "bad.toml"
    config.write_text(
        "registries = []\n"
        '[server]\nport = "abc"\n'
        '[cache]\ntype = "postgres"\nurl = "redis://x"\n'
        '[storage]\ntype = "filesystem"\npath = 42\nbuckt = "b"\n'
    )
    expected = [
        "batlehub: configuration has 4 problem(s):",
        '  server.port: expected an integer, got "abc"',
        "  cache.url: expected a postgresql:// URL, got 'redis://x'",
        "  storage.path: expected a path, got 42",
        "  storage.buckt: unknown key for type 'filesystem' (known: path, type)",
    ]
    result = run(["check-config", "--config", str(config)], env)
    assert result.returncode == 1 and result.stderr.splitlines() == expected
    # serve and migrate check the same way: every problem in one round, not the core's first.
    for command in ("serve", "migrate"):
        result = run([command, "--config", str(config)], env)
        assert result.returncode == 1 and result.stderr.splitlines() == expected, command


def test_check_config_names_missing_plugins(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text('registries = []\n[storage]\ntype = "gcs"\nbucket = "b"\n[cache]\ntype = "memcached"\n')
    result = run(["check-config", "--config", str(config)], env)
    assert result.returncode == 1
    assert '  [cache] type "memcached" is not installed (installed: memory, postgres)' in result.stderr
    assert '  [storage] type "gcs" is not installed (installed: filesystem)' in result.stderr


def test_check_config_good_file_and_env_override(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text("registries = []\n[server]\nport = 8081\n")
    result = run(["check-config", "--config", str(config)], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"configuration is valid ({config})"
    broken = run(["check-config", "--config", str(config)], {**env, "BATLEHUB_SERVER__PORT": "abc"})
    assert broken.returncode == 1
    assert 'server.port: expected an integer, got "abc"' in broken.stderr
    via_env = run(["check-config"], {**env, "BATLEHUB_CONFIG": str(config)})
    assert via_env.returncode == 0, via_env.stderr


def test_check_config_missing_file(env: dict[str, str], tmp_path: Path) -> None:
    result = run(["check-config", "--config", str(tmp_path / "nope.toml")], env)
    assert result.returncode == 1
    assert "nope.toml" in result.stderr and "does not exist" in result.stderr


# --- migrate -------------------------------------------------------------------------------------------


def test_migrate_sqlite_prints_progress_and_version(env: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = run(["migrate", "--data-dir", str(data)], env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"applying migration 1 (1/{len(MIGRATIONS)}): ")
    assert lines[-1] == f"database is at version {LATEST} ({len(MIGRATIONS)} migration(s) applied)"
    assert (data / "batlehub.db").is_file()
    again = run(["migrate", "--data-dir", str(data)], env)
    assert again.stdout.splitlines() == [f"database is at version {LATEST} (0 migration(s) applied)"]


def test_migrate_postgresql(env: dict[str, str], tmp_path: Path, fresh_postgres_url: str) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(f'registries = []\n[database]\ntype = "postgresql"\nurl = "{fresh_postgres_url}"\n')
    result = run(["migrate", "--config", str(config)], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"database is at version {LATEST} ({len(MIGRATIONS)} migration(s) applied)"


# --- serve ---------------------------------------------------------------------------------------------


def start_server(
    servers: list[Hub],
    env: dict[str, str],
    port: int,
    log: Path,
    *,
    config: Path | None = None,
    data_dir: Path | None = None,
) -> Hub:
    """`batlehub serve` run through the installed command, as an operator runs it, once healthy."""
    server = Hub(config_path=config, data_dir=data_dir, log_path=log, port=port, env=env, command=batlehub_command())
    servers.append(server)
    server.start_blocking()
    return server


def get(server: Hub, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture
def servers() -> Iterator[list[Hub]]:
    started: list[Hub] = []
    yield started
    for server in started:
        server.process.kill()


def test_serve_embedded_default(tmp_path: Path, env: dict[str, str], servers: list[Hub]) -> None:
    """No config at all: SQLite, filesystem, memory cache, one npm registry, a first-start admin token."""
    pytest.importorskip("batlehub_npm", reason="the embedded default's npm registry needs batlehub-npm")
    port = free_port()
    env = {**env, "BATLEHUB_SERVER__PORT": str(port), "BATLEHUB_SERVER__HOST": "127.0.0.1"}
    del env["BATLEHUB_DISABLE_PLUGIN_AUTOLOAD"]
    data = tmp_path / "xdg" / "batlehub"
    server = start_server(servers, env, port, tmp_path / "serve.log")

    token_file = data / "admin.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert str(token_file) in server.logs()
    assert token not in server.logs()
    assert (data / "batlehub.db").is_file()
    status, body = get(server, "/api/v1/registries")
    assert status == 200
    assert ("npm", "npm", "hybrid") in [(r["name"], r["type"], r["mode"]) for r in body["registries"]]
    # The log is the guide: where the registry is, what it proxies, what to paste, the admin token.
    logs = server.logs()
    assert "registry npm: proxying http://127.0.0.1:9/, the registry your npm client uses" in logs
    assert f"registry=http://127.0.0.1:{port}/registries/npm/" in logs
    assert f"//127.0.0.1:{port}/registries/npm/:_authToken=" in logs
    assert f"admin token: in {token_file}" in logs
    if importlib.util.find_spec("batlehub_pypi") is not None:  # each installed format offers its own
        assert "registry pypi: proxying http://127.0.0.1:9/simple/, the index your pip uses" in logs
        assert f"index-url = http://127.0.0.1:{port}/registries/pypi/simple/" in logs
    assert get(server, "/api/v1/admin/tokens", {"Authorization": f"Bearer {token}"})[0] == 200

    server.process.proc.send_signal(signal.SIGTERM)
    assert server.process.proc.wait(30) == 0
    # A second start keeps the first token: no new file, no new token.
    again = start_server(servers, env, port, tmp_path / "serve2.log")
    assert token_file.read_text().strip() == token
    assert "created an admin token" not in again.logs()
    assert get(again, "/api/v1/admin/tokens", {"Authorization": f"Bearer {token}"})[0] == 200


def test_serve_without_the_npm_plugin_names_what_is_missing(env: dict[str, str], tmp_path: Path) -> None:
    result = run(["serve", "--data-dir", str(tmp_path / "data")], {**env, "BATLEHUB_SERVER__PORT": str(free_port())})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "no installed format offers a default one" in result.stderr
    assert "install a registry format plugin" in result.stderr


def test_serve_on_a_taken_port_is_one_clear_line(env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "hub.toml"
        config.write_text(f'registries = []\n[server]\nhost = "127.0.0.1"\nport = {port}\n')
        result = run(["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")], env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"batlehub: cannot listen on 127.0.0.1:{port}" in result.stderr


def test_sigterm_drains_in_flight_requests_and_exits_0(env: dict[str, str], tmp_path: Path, servers: list[Hub]) -> None:
    """A download in flight when SIGTERM arrives completes; new connections are refused (or told
    503 by health); a client that stopped reading does not keep the process beyond
    shutdown_timeout_secs; the exit code is 0."""
    shutdown_timeout = 4
    ui = tmp_path / "ui"
    ui.mkdir()
    (ui / "index.html").write_text("<html></html>")
    size = 32 * 1024 * 1024
    (ui / "big.bin").write_bytes(os.urandom(1024) * (size // 1024))
    port = free_port()
    config = tmp_path / "hub.toml"
    config.write_text(
        f'registries = []\n[server]\nhost = "127.0.0.1"\nport = {port}\nstatic_dir = "{ui}"\n'
        f"shutdown_timeout_secs = {shutdown_timeout}\n"
    )
    server = start_server(servers, env, port, tmp_path / "log", config=config, data_dir=tmp_path / "data")

    request = b"GET /big.bin HTTP/1.1\r\nHost: hub\r\n\r\n"
    with (
        socket.create_connection(("127.0.0.1", port)) as download,
        socket.create_connection(("127.0.0.1", port)) as stalled,
    ):
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(request)  # and never reads: its response can never finish
        download.sendall(request)
        received = download.recv(8192)
        assert received.startswith(b"HTTP/1.1 200")
        signalled = time.monotonic()
        server.process.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            status, _ = get(server, "/api/v1/admin/health")
            assert status == 503
        except (ConnectionError, urllib.error.URLError):
            pass  # already not accepting: just as good for a load balancer
        while chunk := download.recv(1024 * 1024):
            received += chunk
        downloaded_after = time.monotonic() - signalled
        header_end = received.index(b"\r\n\r\n") + 4
        assert len(received) - header_end == size, f"download cut after {downloaded_after:.1f}s"
        assert server.process.proc.wait(shutdown_timeout + 10) == 0
    stopped_after = time.monotonic() - signalled
    assert stopped_after < shutdown_timeout + 2, f"exited {stopped_after:.1f}s after SIGTERM"
    logs = server.logs()
    assert "shutting down: draining in-flight requests" in logs
    assert "Traceback" not in logs


FAILING_PLUGIN_SERVE = """
import sys
import batlehub.plugins
from batlehub.plugins import hookimpl

class FailingStartup:
    @hookimpl
    def startup(self, app, settings):
        raise RuntimeError("plugin could not start")

_real = batlehub.plugins.get_plugin_manager

def get_plugin_manager(load_entrypoints=True):
    pm = _real(load_entrypoints=False)
    pm.register(FailingStartup(), name="failing-startup")
    return pm

batlehub.plugins.get_plugin_manager = get_plugin_manager
from batlehub.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_exits_when_a_plugin_fails_to_start(env: dict[str, str], tmp_path: Path) -> None:
    """An unexpected start-up failure must end the process (an orchestrator restarts it), not
    leave it hanging on the backends' threads that were already open."""
    config = tmp_path / "hub.toml"
    config.write_text(f'registries = []\n[server]\nhost = "127.0.0.1"\nport = {free_port()}\n')
    result = subprocess.run(
        [sys.executable, "-c", FAILING_PLUGIN_SERVE, "serve", "--config", str(config), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode != 0
    assert "plugin could not start" in result.stderr


def test_serve_with_an_unwritable_data_dir_is_one_clear_line(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    config = tmp_path / "hub.toml"
    config.write_text(
        f'registries = []\n[server]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'[database]\npath = "{tmp_path / "db" / "hub.db"}"\n[storage]\npath = "{tmp_path / "blobs"}"\n'
    )
    result = run(["serve", "--config", str(config), "--data-dir", str(tmp_path / "afile" / "sub")], env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "batlehub: cannot write the first-start admin token to " in result.stderr
