"""End to end: hybrid and proxy registries in front of a real upstream (Verdaccio), used by the
real npm CLI. A name the upstream has cannot be published locally unless an admin reserves it;
once reserved it is served from local data only, never merged with the upstream's versions, and
the upstream is never asked for it again; every other name comes through the proxy; a proxy
refuses publishes."""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from batlehub_npm_testing.clients import make_package, npm_env, ok, run_npm

from batlehub.testing.hub import Hub, HubFactory, token_auth_toml
from batlehub.testing.services import run_coroutine_sync

pytestmark = [pytest.mark.npm_cli]

ALICE = "hybrid-alice-token-0123456789"
ADMIN = "hybrid-admin-token-0123456789"


def config(upstream: str) -> str:
    return f"""
{token_auth_toml({"alice": (ALICE, "user"), "admin": (ADMIN, "admin")})}

[[registries]]
type = "npm"
name = "npm"
mode = "hybrid"
upstreams = ["{upstream}"]

[[registries]]
type = "npm"
name = "mirror"
mode = "proxy"
upstreams = ["{upstream}"]
"""


@pytest.fixture(scope="module")
def upstream_names(verdaccio: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two packages in the upstream: one that will be shadowed locally, one that will not."""
    suffix = uuid.uuid4().hex[:8]
    names = {"shadowed": f"hy-shadowed-{suffix}", "remote": f"hy-remote-{suffix}"}
    source = tmp_path_factory.mktemp("upstream-src")
    for name in names.values():
        for version in ("1.0.0", "2.0.0"):
            verdaccio.publish(make_package(source, name, version))
    return names


@pytest.fixture(scope="module")
def hybrid_hub(
    verdaccio: Any, upstream_names: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hub]:
    factory = HubFactory(tmp_path_factory.mktemp("hybrid-hub"))
    try:
        yield run_coroutine_sync(lambda: factory(config(verdaccio.url)))
    finally:
        factory.stop_all()


def view(tmp_path: Path, registry: str, spec: str, *fields: str) -> Any:
    return json.loads(ok(run_npm(["view", spec, *fields, "--json"], cwd=tmp_path, env=npm_env(tmp_path, registry))))


def reserve(hub: Hub, name: str) -> None:
    request = urllib.request.Request(
        f"{hub.url}/api/v1/admin/registries/npm/reserved/{name}",
        data=json.dumps({"reason": "our own package"}).encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201


def test_an_upstream_name_is_published_locally_only_once_reserved(
    tmp_path: Path, hybrid_hub: Hub, upstream_names: dict[str, str], verdaccio: Any
) -> None:
    registry = f"{hybrid_hub.url}/registries/npm/"
    shadowed = upstream_names["shadowed"]
    assert view(tmp_path, registry, shadowed, "versions") == ["1.0.0", "2.0.0"]  # proxied while not local

    # Dependency confusion, closed: a user cannot take over a name the upstream has.
    folder = make_package(tmp_path / "src", shadowed, "3.0.0")
    refused = run_npm(["publish"], cwd=folder, env=npm_env(tmp_path, registry, ALICE))
    assert refused.returncode != 0
    assert "E403" in refused.stderr and "exists in the upstream registry" in refused.stderr, refused.stderr
    assert view(tmp_path, registry, shadowed, "versions") == ["1.0.0", "2.0.0"]

    reserve(hybrid_hub, shadowed)
    asked = verdaccio.request_count(re.compile(rf"^/{shadowed}(\?|$)"))
    ok(run_npm(["publish"], cwd=folder, env=npm_env(tmp_path, registry, ALICE)))
    assert view(tmp_path, registry, shadowed, "versions") == ["3.0.0"]  # local only, never merged

    project = tmp_path / "project"
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": "consumer", "version": "1.0.0"}))
    env = npm_env(tmp_path, registry)
    ok(run_npm(["install", shadowed, upstream_names["remote"]], cwd=project, env=env))
    installed = {
        name: json.loads((project / "node_modules" / name / "package.json").read_text())["version"]
        for name in (shadowed, upstream_names["remote"])
    }
    assert installed == {shadowed: "3.0.0", upstream_names["remote"]: "2.0.0"}
    lock = (project / "package-lock.json").read_text()
    assert "4873" not in lock and "verdaccio" not in lock.lower()
    # Reserved: the upstream was never asked for that name again, whatever the clients asked.
    assert verdaccio.request_count(re.compile(rf"^/{shadowed}(\?|$)")) == asked

    # Audit goes to the upstream as is; this Verdaccio has no audit service and says 404, which
    # must reach npm unchanged (not a hub error, and not an invented "no vulnerabilities").
    audit = run_npm(["audit", "--json"], cwd=project, env=env)
    assert "404 Not Found - POST " + registry + "-/npm/v1/security/" in audit.stdout + audit.stderr


def test_search_finds_local_and_known_upstream_names(
    tmp_path: Path, hybrid_hub: Hub, upstream_names: dict[str, str]
) -> None:
    registry = f"{hybrid_hub.url}/registries/npm/"
    remote = upstream_names["remote"]
    view(tmp_path, registry, remote, "name")  # the hub now knows this upstream name
    found = json.loads(ok(run_npm(["search", remote, "--json"], cwd=tmp_path, env=npm_env(tmp_path, registry))))
    assert [(p["name"], p["version"]) for p in found] == [(remote, "2.0.0")]


def test_a_proxy_refuses_publishes_with_a_clear_message(tmp_path: Path, hybrid_hub: Hub) -> None:
    registry = f"{hybrid_hub.url}/registries/mirror/"
    folder = make_package(tmp_path / "src", f"hy-refused-{uuid.uuid4().hex[:8]}", "1.0.0")
    result = run_npm(["publish"], cwd=folder, env=npm_env(tmp_path, registry, ALICE))
    assert result.returncode != 0
    assert "read-only proxy" in result.stdout + result.stderr


def test_upstream_packages_cannot_be_changed_through_a_hybrid_registry(
    tmp_path: Path, hybrid_hub: Hub, upstream_names: dict[str, str]
) -> None:
    registry = f"{hybrid_hub.url}/registries/npm/"
    remote = upstream_names["remote"]
    for token, args in (
        (ADMIN, ["unpublish", f"{remote}@1.0.0"]),
        (ALICE, ["dist-tag", "add", f"{remote}@1.0.0", "mine"]),
        (ALICE, ["deprecate", f"{remote}@1.0.0", "do not use"]),
    ):
        result = run_npm(args, cwd=tmp_path, env=npm_env(tmp_path, registry, token))
        assert result.returncode != 0, args  # npm must not report success for something that did not happen
        assert "comes from an upstream registry" in result.stdout + result.stderr
    assert view(tmp_path, registry, remote, "versions") == ["1.0.0", "2.0.0"]
