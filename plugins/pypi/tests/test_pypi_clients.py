"""End to end: a hybrid PyPI registry in front of a real upstream index (pypiserver), used by the
real twine, pip and uv. Local projects are uploaded with twine and refused as PyPI refuses them;
pip and uv install a local project whose dependencies come from the upstream; pip installs with
`--require-hashes`; uv resolves from the JSON pages and `.metadata` files without fetching a wheel;
with the upstream stopped, everything installed before installs again from a fresh client cache;
a file changed upstream after its index announced its hash is refused."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from batlehub_pypi_testing.clients import (
    client_env,
    ok,
    output,
    pip_install,
    twine_upload,
    uv,
    uv_pip_install,
)
from batlehub_pypi_testing.packages import build_distributions

from batlehub.testing.hub import Hub, HubFactory, token_auth_toml
from batlehub.testing.services import run_coroutine_sync

pytestmark = [pytest.mark.pypi_cli]

ALICE = "pypi-alice-token-0123456789"
BOB = "pypi-bob-token-0123456789"
ADMIN = "pypi-admin-token-0123456789"


def config(upstream: str) -> str:
    return f"""
{token_auth_toml({"alice": (ALICE, "user"), "bob": (BOB, "user"), "admin": (ADMIN, "admin")})}

[[registries]]
type = "pypi"
name = "pypi"
mode = "hybrid"
upstreams = ["{upstream}"]
"""


class Names:
    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:6]
        self.dep = f"updep-{suffix}"
        self.leaf = f"upleaf-{suffix}"
        self.tampered = f"uptamper-{suffix}"
        self.shadowed = f"upshadow-{suffix}"
        self.app = f"locapp-{suffix}"


@pytest.fixture(scope="module")
def names() -> Names:
    return Names()


@pytest.fixture(scope="module")
def dists(names: Names, pypiserver: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Real wheels and sdists, built offline; the upstream ones uploaded to pypiserver."""
    scratch = tmp_path_factory.mktemp("build")
    out = tmp_path_factory.mktemp("dists")
    built = {
        "dep1": build_distributions(names.dep, "1.0", out / "dep1", scratch=scratch),
        "dep2": build_distributions(names.dep, "2.0", out / "dep2", dependencies=[names.leaf], scratch=scratch),
        "leaf": build_distributions(names.leaf, "1.0", out / "leaf", scratch=scratch),
        "tampered": build_distributions(names.tampered, "1.0", out / "tampered", scratch=scratch),
        "shadowed": build_distributions(names.shadowed, "1.0", out / "shadowed", scratch=scratch),
        "app1": build_distributions(names.app, "1.0", out / "app1", dependencies=[f"{names.dep}>=2"], scratch=scratch),
        "app11": build_distributions(names.app, "1.1", out / "app11", scratch=scratch),
    }
    pypiserver.upload(built["dep1"] + built["dep2"] + built["leaf"] + built["tampered"] + built["shadowed"])
    return built


@pytest.fixture(scope="module")
def hub(pypiserver: Any, dists: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    factory = HubFactory(tmp_path_factory.mktemp("pypi-hub"))
    try:
        yield run_coroutine_sync(lambda: factory(config(pypiserver.index_url)))
    finally:
        factory.stop_all()


def wheel(files: list[Path]) -> Path:
    return next(f for f in files if f.suffix == ".whl")


def access_lines(hub: Hub, since: int) -> list[str]:
    return [line for line in hub.logs()[since:].splitlines() if "batlehub.access" in line]


def http(method: str, url: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw[:1] in (b"{", b"[") else raw
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw[:1] == b"{" else raw


@pytest.fixture(scope="module")
def uploaded(hub: Hub, dists: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> None:
    """alice's local project, uploaded with twine."""
    env = client_env(tmp_path_factory.mktemp("twine"))
    ok(twine_upload(f"{hub.url}/registries/pypi/", dists["app1"], env, ALICE))


def test_twine_upload_needs_a_token_and_ownership_and_refuses_a_duplicate(
    hub: Hub, names: Names, dists: dict[str, list[Path]], uploaded: None, tmp_path: Path
) -> None:
    env = client_env(tmp_path)
    url = f"{hub.url}/registries/pypi/"
    nobody = twine_upload(url, dists["app11"], env, "not-a-token-0123456789")
    assert nobody.returncode != 0 and "401" in output(nobody), output(nobody)
    status, _ = http("POST", url)  # no credentials at all
    assert status == 401

    bob = twine_upload(url, dists["app11"], env, BOB)
    assert bob.returncode != 0 and "403" in output(bob), output(bob)

    again = twine_upload(url, [wheel(dists["app1"])], env, ALICE)
    assert again.returncode != 0 and "400" in output(again) and "File already exists" in output(again)

    # uv publish speaks the same API, with the same token.
    ok(uv(["publish", "--publish-url", url, "--token", ALICE, *map(str, dists["app11"])], env))
    status, doc = http("GET", f"{hub.url}/registries/pypi/pypi/{names.app}/json")
    assert status == 200 and set(doc["releases"]) == {"1.0", "1.1"}, doc


def test_a_name_the_upstream_has_stays_the_upstreams_unless_reserved(hub: Hub, names: Names, tmp_path: Path) -> None:
    env = client_env(tmp_path)
    url = f"{hub.url}/registries/pypi/"
    shadow = build_distributions(names.shadowed, "9.0", tmp_path / "shadow", scratch=tmp_path)
    refused = twine_upload(url, shadow, env, ALICE)
    assert refused.returncode != 0 and "403" in output(refused), output(refused)

    status, _ = http(
        "PUT", f"{hub.url}/api/v1/admin/registries/pypi/reserved/{names.shadowed}", ADMIN, {"reason": "ours"}
    )
    assert status in (200, 201)
    ok(twine_upload(url, shadow, env, ALICE))
    # Local data only from now on: the upstream's 1.0 is never merged in.
    status, doc = http("GET", f"{url}pypi/{names.shadowed}/json")
    assert status == 200 and list(doc["releases"]) == ["9.0"], doc
    ok(pip_install(f"{url}simple/", [names.shadowed], tmp_path / "t", client_env(tmp_path)))
    assert [p.name for p in (tmp_path / "t").glob("*.dist-info")] == [
        f"{names.shadowed.replace('-', '_')}-9.0.dist-info"
    ]


def test_pip_and_uv_install_a_local_project_with_upstream_dependencies(
    hub: Hub, names: Names, uploaded: None, tmp_path: Path
) -> None:
    index = f"{hub.url}/registries/pypi/simple/"
    env = client_env(tmp_path)
    ok(pip_install(index, [f"{names.app}==1.0"], tmp_path / "pip", env))
    installed = {p.name.split("-")[0] for p in (tmp_path / "pip").glob("*.dist-info")}
    assert installed == {m.replace("-", "_") for m in (names.app, names.dep, names.leaf)}, installed

    ok(uv_pip_install(index, [f"{names.app}==1.0"], tmp_path / "uv", client_env(tmp_path)))
    installed = {p.name.split("-")[0] for p in (tmp_path / "uv").glob("*.dist-info")}
    assert installed == {m.replace("-", "_") for m in (names.app, names.dep, names.leaf)}, installed


def test_pip_install_require_hashes_through_the_hub(
    hub: Hub, names: Names, dists: dict[str, list[Path]], uploaded: None, tmp_path: Path
) -> None:
    lines = []
    for key, name, version in (("app1", names.app, "1.0"), ("dep2", names.dep, "2.0"), ("leaf", names.leaf, "1.0")):
        digest = hashlib.sha256(wheel(dists[key]).read_bytes()).hexdigest()
        lines.append(f"{name}=={version} --hash=sha256:{digest}")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(lines) + "\n")
    index = f"{hub.url}/registries/pypi/simple/"
    ok(pip_install(index, ["--require-hashes", "-r", str(requirements)], tmp_path / "t", client_env(tmp_path)))

    # A wrong hash is caught by pip: the hub serves the bytes its page announces.
    requirements.write_text(lines[0].rsplit("sha256:", 1)[0] + "sha256:" + "0" * 64 + "\n" + "\n".join(lines[1:]))
    wrong = pip_install(index, ["--require-hashes", "-r", str(requirements)], tmp_path / "w", client_env(tmp_path))
    assert wrong.returncode != 0 and "HASHES" in output(wrong).upper()


def test_uv_resolves_from_json_pages_and_metadata_files_without_fetching_wheels(
    hub: Hub, names: Names, uploaded: None, tmp_path: Path
) -> None:
    since = len(hub.logs())
    requirements = tmp_path / "requirements.in"
    requirements.write_text(f"{names.app}==1.0\n")
    index = f"{hub.url}/registries/pypi/simple/"
    env = client_env(tmp_path)
    resolved = ok(uv(["pip", "compile", "--no-cache", "--index-url", index, str(requirements)], env))
    assert f"{names.app}==1.0" in resolved and f"{names.dep}==2.0" in resolved, resolved
    lines = access_lines(hub, since)
    local = [line for line in lines if f"/files/{names.app}/" in line]
    assert any(".whl.metadata 200" in line for line in local), lines
    assert not any(re.search(r"\.whl \d{3}", line) for line in local), "a local wheel was fetched only to resolve"

    # uv asked for (and got) the PEP 691 JSON form of the pages.
    page = urllib.request.Request(index + names.app + "/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(page) as response:
        assert response.headers["Content-Type"] == "application/vnd.pypi.simple.v1+json"
        doc = json.load(response)
    wheels = [f for f in doc["files"] if f["filename"].endswith(".whl")]
    assert wheels and all(f["core-metadata"]["sha256"] and f["hashes"]["sha256"] for f in wheels)


def test_pip_resolves_with_metadata_files_only(hub: Hub, names: Names, uploaded: None, tmp_path: Path) -> None:
    since = len(hub.logs())
    index = f"{hub.url}/registries/pypi/simple/"
    report = tmp_path / "report.json"
    ok(
        pip_install(
            index, [f"{names.app}==1.0"], tmp_path / "t", client_env(tmp_path), "--dry-run", "--report", str(report)
        )
    )
    local = [line for line in access_lines(hub, since) if f"/files/{names.app}/" in line]
    assert any(".whl.metadata 200" in line for line in local), local
    assert not any(re.search(r"\.whl \d{3}", line) for line in local), local


def test_a_file_changed_upstream_after_its_page_is_refused(
    hub: Hub, names: Names, pypiserver: Any, dists: dict[str, list[Path]], tmp_path: Path
) -> None:
    index = f"{hub.url}/registries/pypi/simple/"
    status, _ = http("GET", index + names.tampered + "/")  # the hub keeps the page with its hashes
    assert status == 200
    target = pypiserver.path_of(wheel(dists["tampered"]).name)
    data = bytearray(target.read_bytes())
    data[-30] ^= 0xFF
    target.write_bytes(bytes(data))
    result = pip_install(index, [names.tampered], tmp_path / "t", client_env(tmp_path), "--only-binary", ":all:")
    assert result.returncode != 0, output(result)
    status, body = http("GET", f"{hub.url}/registries/pypi/files/{names.tampered}/{wheel(dists['tampered']).name}")
    assert status in (422, 502) and "integrity" in body["error"], (status, body)


def test_with_the_upstream_stopped_what_was_installed_installs_again(
    hub: Hub, names: Names, pypiserver: Any, uploaded: None, tmp_path: Path
) -> None:
    index = f"{hub.url}/registries/pypi/simple/"
    ok(pip_install(index, [f"{names.app}==1.0"], tmp_path / "warm", client_env(tmp_path)))
    ok(uv_pip_install(index, [f"{names.app}==1.0"], tmp_path / "warm-uv", client_env(tmp_path)))
    pypiserver.stop()
    # Fresh client caches: everything comes from the hub's stored pages and files.
    ok(pip_install(index, [f"{names.app}==1.0"], tmp_path / "pip", client_env(tmp_path)))
    ok(uv_pip_install(index, [f"{names.app}==1.0"], tmp_path / "uv", client_env(tmp_path)))
    for target in ("pip", "uv"):
        installed = {p.name.split("-")[0] for p in (tmp_path / target).glob("*.dist-info")}
        assert installed == {m.replace("-", "_") for m in (names.app, names.dep, names.leaf)}, installed


def test_batlehub_plugins_lists_the_format() -> None:
    result = subprocess.run([sys.executable, "-m", "batlehub", "plugins"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^pypi\s+\[batlehub-pypi [0-9.]+\]", result.stdout, re.M), result.stdout
    assert "registry:pypi" in result.stdout
