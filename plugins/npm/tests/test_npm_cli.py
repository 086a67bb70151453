"""End to end: the real npm, pnpm and yarn clients against a real `batlehub serve` process with
local npm registries. One hub serves the whole module (starting one costs about a second, every
client command about as much), and each test uses its own package names."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from batlehub_npm_testing.clients import make_package, npm_env, ok, output, run_npm
from batlehub_npm_testing.services import NodeTools

from batlehub.testing.hub import Hub, HubFactory, token_auth_toml
from batlehub.testing.services import run_coroutine_sync

pytestmark = [pytest.mark.npm_cli]

ADMIN = "e2e-admin-token-0123456789"
ALICE = "e2e-alice-token-0123456789"
BOB = "e2e-bob-token-0123456789"

CONFIG = f"""
{token_auth_toml({"admin": (ADMIN, "admin"), "alice": (ALICE, "user"), "bob": (BOB, "user")})}

[[registries]]
type = "npm"
name = "npm"
mode = "local"

[[registries]]
type = "npm"
name = "readonly"
mode = "local"
[registries.rbac]
user = ["releases:read", "source:read"]
"""


@pytest.fixture(scope="module")
def npm_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    factory = HubFactory(tmp_path_factory.mktemp("npm-hub"))
    try:
        yield run_coroutine_sync(lambda: factory(CONFIG))
    finally:
        factory.stop_all()


@pytest.fixture
def registry(npm_hub: Hub) -> str:
    return f"{npm_hub.url}/registries/npm/"


def publish(tmp_path: Path, registry: str, token: str | None, name: str, version: str, **kw: Any) -> Any:
    folder = make_package(tmp_path / "src", name, version, **kw)
    return run_npm(["publish"], cwd=folder, env=npm_env(tmp_path, registry, token))


def fresh_project(tmp_path: Path, label: str) -> Path:
    project = tmp_path / label
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": f"consumer-{label}", "version": "1.0.0"}))
    return project


def view(tmp_path: Path, registry: str, spec: str, *fields: str) -> Any:
    result = run_npm(["view", spec, *fields, "--json"], cwd=tmp_path, env=npm_env(tmp_path, registry))
    text = ok(result).strip()
    return json.loads(text) if text else None


def http_json(url: str, token: str | None = None, method: str = "GET", body: Any = None) -> Any:
    request = urllib.request.Request(url, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, data=data, timeout=10) as response:
        return json.loads(response.read())


def test_publish_scoped_and_install_into_a_fresh_project(tmp_path: Path, registry: str) -> None:
    ok(publish(tmp_path, registry, ALICE, "e2e-base", "1.0.0"))
    ok(publish(tmp_path, registry, ALICE, "@e2e/util", "1.2.0", dependencies={"e2e-base": "^1.0.0"}))

    project = fresh_project(tmp_path, "install")
    ok(run_npm(["install", "@e2e/util"], cwd=project, env=npm_env(tmp_path, registry)))

    loaded = subprocess.run(
        ["node", "-e", "console.log(require('@e2e/util'), require('e2e-base'))"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.split() == ["@e2e/util@1.2.0", "e2e-base@1.0.0"]
    lock = json.loads((project / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/@e2e/util"]["version"] == "1.2.0"
    assert lock["packages"]["node_modules/@e2e/util"]["integrity"].startswith("sha512-")


def test_publishing_the_same_version_twice_is_a_clear_conflict(tmp_path: Path, registry: str) -> None:
    ok(publish(tmp_path, registry, ALICE, "e2e-twice", "1.0.0"))
    again = publish(tmp_path, registry, ALICE, "e2e-twice", "1.0.0")
    assert again.returncode != 0
    # npm 11 spots the existing version in our packument before uploading; older clients get our 409.
    text = output(again)
    assert "cannot publish over the previously published versions: 1.0.0" in text or "EPUBLISHCONFLICT" in text, text


def test_anonymous_publish_is_refused_with_401(tmp_path: Path, registry: str) -> None:
    result = publish(tmp_path, registry, None, "e2e-anon", "1.0.0")
    assert result.returncode != 0
    assert "ENEEDAUTH" in output(result)  # npm knows it needs a token; the server agrees:
    request = urllib.request.Request(registry + "e2e-anon", method="PUT", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    assert "authentication required to publish" in json.loads(refused.value.read())["error"]
    missing = run_npm(["view", "e2e-anon"], cwd=tmp_path, env=npm_env(tmp_path, registry))
    assert missing.returncode != 0 and "E404" in output(missing)


def test_a_user_without_publish_permission_gets_403(tmp_path: Path, npm_hub: Hub) -> None:
    readonly = f"{npm_hub.url}/registries/readonly/"
    result = publish(tmp_path, readonly, BOB, "e2e-readonly", "1.0.0")
    assert result.returncode != 0
    text = output(result)
    assert "403" in text and "may not publish" in text, text
    ok(publish(tmp_path, readonly, ADMIN, "e2e-readonly", "1.0.0"))  # the admin may


def test_dist_tags_add_ls_rm(tmp_path: Path, registry: str) -> None:
    ok(publish(tmp_path, registry, ALICE, "e2e-tags", "1.0.0"))
    ok(publish(tmp_path, registry, ALICE, "e2e-tags", "2.0.0-beta.1", publishConfig={"tag": "next"}))
    env = npm_env(tmp_path, registry, ALICE)
    assert view(tmp_path, registry, "e2e-tags", "dist-tags") == {"latest": "1.0.0", "next": "2.0.0-beta.1"}

    ok(run_npm(["dist-tag", "add", "e2e-tags@1.0.0", "stable"], cwd=tmp_path, env=env))
    listed = ok(run_npm(["dist-tag", "ls", "e2e-tags"], cwd=tmp_path, env=env))
    assert "stable: 1.0.0" in listed and "next: 2.0.0-beta.1" in listed

    # Only owners (and admins) change a package's tags; an owner may also remove them.
    denied = run_npm(["dist-tag", "rm", "e2e-tags", "next"], cwd=tmp_path, env=npm_env(tmp_path, registry, BOB))
    assert denied.returncode != 0 and "E403" in output(denied) and "owned by alice" in output(denied)
    ok(run_npm(["dist-tag", "rm", "e2e-tags", "next"], cwd=tmp_path, env=env))
    ok(run_npm(["dist-tag", "rm", "e2e-tags", "stable"], cwd=tmp_path, env=npm_env(tmp_path, registry, ADMIN)))
    assert view(tmp_path, registry, "e2e-tags", "dist-tags") == {"latest": "1.0.0"}


def test_deprecate_and_undeprecate(tmp_path: Path, registry: str) -> None:
    ok(publish(tmp_path, registry, ALICE, "e2e-old", "1.0.0"))
    ok(publish(tmp_path, registry, ALICE, "e2e-old", "1.1.0"))
    env = npm_env(tmp_path, registry, ALICE)
    ok(run_npm(["deprecate", "e2e-old@1.0.0", "use 1.1.0 instead"], cwd=tmp_path, env=env))
    assert view(tmp_path, registry, "e2e-old@1.0.0", "deprecated") == "use 1.1.0 instead"
    assert view(tmp_path, registry, "e2e-old@1.1.0", "deprecated") is None

    project = fresh_project(tmp_path, "deprecated")
    installed = run_npm(["install", "e2e-old@1.0.0"], cwd=project, env=npm_env(tmp_path, registry))
    ok(installed)
    assert "deprecated e2e-old@1.0.0: use 1.1.0 instead" in output(installed)

    ok(run_npm(["deprecate", "e2e-old@1.0.0", ""], cwd=tmp_path, env=env))
    assert view(tmp_path, registry, "e2e-old@1.0.0", "deprecated") is None


def test_unpublish_one_version_then_the_whole_package(tmp_path: Path, registry: str, npm_hub: Hub) -> None:
    ok(publish(tmp_path, registry, ALICE, "@e2e/gone", "1.0.0"))
    ok(publish(tmp_path, registry, ALICE, "@e2e/gone", "1.0.1"))
    admin = npm_env(tmp_path, registry, ADMIN)  # users may publish; deleting needs releases:delete

    denied = run_npm(["unpublish", "@e2e/gone@1.0.1"], cwd=tmp_path, env=npm_env(tmp_path, registry, ALICE))
    assert denied.returncode != 0 and "403" in output(denied)

    ok(run_npm(["unpublish", "@e2e/gone@1.0.1"], cwd=tmp_path, env=admin))
    assert view(tmp_path, registry, "@e2e/gone", "versions") == ["1.0.0"]
    assert view(tmp_path, registry, "@e2e/gone", "dist-tags") == {"latest": "1.0.0"}

    ok(run_npm(["unpublish", "@e2e/gone", "--force"], cwd=tmp_path, env=admin))
    gone = run_npm(["view", "@e2e/gone"], cwd=tmp_path, env=npm_env(tmp_path, registry))
    assert gone.returncode != 0 and "E404" in output(gone)
    # The name is free again.
    ok(publish(tmp_path, registry, ALICE, "@e2e/gone", "2.0.0"))
    assert view(tmp_path, registry, "@e2e/gone", "versions") == ["2.0.0"]


def test_search_whoami_ping(tmp_path: Path, registry: str) -> None:
    ok(publish(tmp_path, registry, ALICE, "e2e-findme", "3.1.4", keywords=["needle"]))
    env = npm_env(tmp_path, registry, ALICE)
    found = json.loads(ok(run_npm(["search", "findme", "--json"], cwd=tmp_path, env=env)))
    assert [(p["name"], p["version"]) for p in found] == [("e2e-findme", "3.1.4")]

    assert ok(run_npm(["whoami"], cwd=tmp_path, env=env)).strip() == "alice"
    anonymous = run_npm(["whoami"], cwd=tmp_path, env=npm_env(tmp_path, registry))
    assert anonymous.returncode != 0 and "ENEEDAUTH" in output(anonymous)  # npm asks no server without a token
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(registry + "-/whoami", timeout=10)
    assert refused.value.code == 401
    ok(run_npm(["ping"], cwd=tmp_path, env=env))


def test_logout_revokes_the_database_token(tmp_path: Path, registry: str, npm_hub: Hub) -> None:
    created = http_json(f"{npm_hub.url}/api/v1/admin/tokens", ADMIN, "POST", {"user_id": "carol", "role": "user"})
    token = created["token"]
    env = npm_env(tmp_path, registry, token)
    assert ok(run_npm(["whoami"], cwd=tmp_path, env=env)).strip() == "carol"
    ok(run_npm(["logout"], cwd=tmp_path, env=env))
    after = run_npm(["whoami"], cwd=tmp_path, env=npm_env(tmp_path, registry, token))
    assert after.returncode != 0 and "401" in output(after)
    # A token from the config file is never revoked from outside, and logging out with it says so.
    refused = run_npm(["logout"], cwd=tmp_path, env=npm_env(tmp_path, registry, ALICE))
    assert refused.returncode != 0 and "cannot be revoked by logging out" in output(refused)
    assert ok(run_npm(["whoami"], cwd=tmp_path, env=npm_env(tmp_path, registry, ALICE))).strip() == "alice"


@pytest.mark.slow
def test_pnpm_and_yarn_install_a_local_package(tmp_path: Path, registry: str, node_tools: NodeTools) -> None:
    ok(publish(tmp_path, registry, ALICE, "e2e-forclients", "1.0.0"))
    ok(publish(tmp_path, registry, ALICE, "@e2e/forclients", "1.0.0", dependencies={"e2e-forclients": "1.0.0"}))
    for label, client, args in (
        ("pnpm", node_tools.pnpm, ["add", "@e2e/forclients"]),
        ("yarn", node_tools.yarn, ["add", "@e2e/forclients", "--non-interactive"]),
    ):
        project = fresh_project(tmp_path, label)
        ok(run_npm(args, cwd=project, env=npm_env(tmp_path, registry), npm=client))
        loaded = subprocess.run(
            ["node", "-e", "console.log(require('@e2e/forclients'))"],
            cwd=project,
            capture_output=True,
            text=True,
        )
        assert loaded.stdout.strip() == "@e2e/forclients@1.0.0", (label, loaded.stderr)


def npm_in_a_terminal(args: list[str], env: dict[str, str], answers: list[tuple[str, str]]) -> str:
    """Run npm on a pseudo-terminal (npm login prompts only there), answering prompts in order."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child becomes npm
        os.execvpe("npm", ["npm", *args], env)
    out = b""
    pending = list(answers)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child exited
                break
            if not chunk:
                break
            out += chunk
            last_line = out.decode(errors="replace").splitlines()[-1] if out else ""
            if pending and pending[0][0] in last_line:
                os.write(fd, pending.pop(0)[1].encode() + b"\r")
    finally:
        os.waitpid(pid, 0)
    return out.decode(errors="replace")


def test_npm_login_with_a_token_as_password(tmp_path: Path, registry: str) -> None:
    """The legacy login (npm's default is the web login, see test_npm_web_login.py)."""
    env = npm_env(tmp_path, registry)
    npmrc = Path(env["npm_config_userconfig"])
    legacy = ["login", "--auth-type=legacy"]
    refused = npm_in_a_terminal(legacy, env, [("Username", "alice"), ("Password", "not-a-token")])
    assert "access token" in refused and "_authToken" not in npmrc.read_text()
    text = npm_in_a_terminal(legacy, env, [("Username", "alice"), ("Password", ALICE)])
    assert "Logged in on " + registry in text, text
    assert f":_authToken={ALICE}" in npmrc.read_text()
    assert ok(run_npm(["whoami"], cwd=tmp_path, env=env)).strip() == "alice"


def peak_memory_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


@pytest.mark.slow
def test_a_big_package_is_published_without_holding_it_in_memory(tmp_path: Path, registry: str, npm_hub: Hub) -> None:
    payload = os.urandom(40 * 1024 * 1024)  # random: gzip cannot shrink it, the body is ~54 MB of base64
    folder = make_package(tmp_path / "src", "e2e-big", "1.0.0", files={"blob.bin": payload})
    assert npm_hub.process.proc is not None
    rss_before, _ = peak_memory_kib(npm_hub.process.proc.pid)
    ok(run_npm(["publish"], cwd=folder, env=npm_env(tmp_path, registry, ALICE)))
    _, peak_after = peak_memory_kib(npm_hub.process.proc.pid)
    assert (peak_after - rss_before) * 1024 < 24 * 1024 * 1024, f"hub grew by {peak_after - rss_before} KiB"

    project = fresh_project(tmp_path, "big")
    ok(run_npm(["install", "e2e-big"], cwd=project, env=npm_env(tmp_path, registry)))
    assert (project / "node_modules" / "e2e-big" / "blob.bin").read_bytes() == payload
