"""npm's test kit gives working services: Verdaccio and the node clients, each exercised with a
real client (the generic services are checked in the core's tests/test_harness.py)."""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from batlehub_npm_testing.clients import make_package, npm_env, run_npm


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return dict(json.load(response))


@pytest.mark.slow
@pytest.mark.npm_cli
def test_verdaccio_accepts_a_publish_from_the_npm_cli(verdaccio: Any, tmp_path: Path) -> None:
    name = f"harness-{uuid.uuid4().hex[:8]}"
    verdaccio.publish(make_package(tmp_path, name, "1.0.0", files={"README.md": "# hi\n"}))

    packument = _get_json(f"{verdaccio.url}{name}")
    assert packument["dist-tags"]["latest"] == "1.0.0"
    assert packument["versions"]["1.0.0"]["dist"]["tarball"].startswith(verdaccio.url)
    assert verdaccio.request_count(f"/{name}", method="PUT") == 1


@pytest.mark.slow
@pytest.mark.npm_cli
def test_npm_installs_from_verdaccio_with_an_isolated_config(verdaccio: Any, node_tools: Any, tmp_path: Path) -> None:
    dep = f"harness-dep-{uuid.uuid4().hex[:8]}"
    verdaccio.publish(make_package(tmp_path / "pkgs", dep, "2.0.0"))
    project = make_package(tmp_path / "app", "app", "0.0.0", dependencies={dep: "^2.0.0"}, private=True)
    before = verdaccio.request_count(f"/{dep}")

    env = npm_env(tmp_path, verdaccio.url)
    result = run_npm(["install"], cwd=project, env=env, npm=node_tools.npm)

    assert result.returncode == 0, result.stderr
    installed = json.loads((project / "node_modules" / dep / "package.json").read_text())
    assert installed["version"] == "2.0.0"
    assert verdaccio.request_count(f"/{dep}") == before + 1


@pytest.mark.slow
@pytest.mark.npm_cli
@pytest.mark.parametrize("client", ["pnpm", "yarn"])
def test_pnpm_and_yarn_install_from_verdaccio_through_npm_env(
    client: str, verdaccio: Any, node_tools: Any, tmp_path: Path
) -> None:
    dep = f"harness-{client}-{uuid.uuid4().hex[:8]}"
    verdaccio.publish(make_package(tmp_path / "pkgs", dep, "3.1.0"))
    project = make_package(tmp_path / "app", "app", "0.0.0", dependencies={dep: "^3.0.0"}, private=True)

    env = npm_env(tmp_path, verdaccio.url)
    result = run_npm(["install"], cwd=project, env=env, npm=getattr(node_tools, client))

    assert result.returncode == 0, result.stdout + result.stderr
    installed = json.loads((project / "node_modules" / dep / "package.json").read_text())
    assert installed["version"] == "3.1.0"
    assert verdaccio.request_count(f"/{dep}") >= 1


@pytest.mark.slow
def test_verdaccio_keeps_packages_across_a_restart(verdaccio: Any, tmp_path: Path) -> None:
    name = f"harness-restart-{uuid.uuid4().hex[:8]}"
    verdaccio.publish(make_package(tmp_path, name, "1.0.0"))
    url = verdaccio.url
    verdaccio.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}{name}", timeout=5)
    verdaccio.start()
    assert verdaccio.url == url
    assert _get_json(f"{url}{name}")["name"] == name
