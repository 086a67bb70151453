"""End to end: pnpm and yarn classic install through a proxy registry (a real `batlehub serve`
in front of a real Verdaccio upstream), with a scoped package and transitive dependencies, and
their lockfiles and tarballs point at the hub, never at the upstream."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from batlehub_npm_testing.clients import make_package, npm_env, ok, run_npm
from batlehub_npm_testing.services import NodeTools

from batlehub.testing.hub import Hub, HubFactory

pytestmark = [pytest.mark.npm_cli]


def proxy_config(upstream: str) -> str:
    return f"""
[[registries]]
type = "npm"
name = "proxy"
mode = "proxy"
upstreams = ["{upstream}"]
"""


@pytest.fixture
def chain(tmp_path: Path, verdaccio: Any) -> tuple[str, str, str]:
    """Three packages in Verdaccio: @scope/top -> middle -> leaf."""
    tag = uuid.uuid4().hex[:8]
    leaf, middle, top = f"e2e-leaf-{tag}", f"e2e-middle-{tag}", f"@e2e-{tag}/top"
    verdaccio.publish(make_package(tmp_path / "src", leaf, "1.0.1"))
    verdaccio.publish(make_package(tmp_path / "src", middle, "2.0.0", dependencies={leaf: "^1.0.0"}))
    verdaccio.publish(make_package(tmp_path / "src", top, "3.0.0", dependencies={middle: "2.0.0"}))
    return top, middle, leaf


RESOLVE = "console.log(require.resolve(process.argv[1] + '/package.json', {paths: [process.argv[2]]}))"


def resolve(name: str, start: Path) -> Path:
    """Where node finds `name` from `start` (pnpm nests transitive dependencies)."""
    out = subprocess.run(["node", "-e", RESOLVE, name, str(start)], capture_output=True, text=True, cwd=start)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip()).parent


def version_at(package_dir: Path) -> str:
    return str(json.loads((package_dir / "package.json").read_text())["version"])


def install_and_check(client: str, binary: str, project: Path, registry: str, scratch: Path, chain: Any) -> None:
    top, middle, leaf = chain
    args = ["add", top] if client == "pnpm" else ["add", top, "--non-interactive"]
    ok(run_npm(args, cwd=project, env=npm_env(scratch, registry), npm=binary))
    top_dir = resolve(top, project)
    middle_dir = resolve(middle, top_dir)
    leaf_dir = resolve(leaf, middle_dir)
    assert (version_at(top_dir), version_at(middle_dir), version_at(leaf_dir)) == ("3.0.0", "2.0.0", "1.0.1")


@pytest.mark.parametrize("client", ["pnpm", "yarn"])
async def test_client_installs_a_scoped_tree_through_a_proxy(
    client: str, tmp_path: Path, hub: HubFactory, verdaccio: Any, node_tools: NodeTools, chain: tuple[str, str, str]
) -> None:
    server: Hub = await hub(proxy_config(verdaccio.url))
    registry = f"{server.url}/registries/proxy/"
    project = tmp_path / client
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": f"consumer-{client}", "version": "1.0.0"}))
    binary = node_tools.pnpm if client == "pnpm" else node_tools.yarn

    await asyncio.to_thread(install_and_check, client, binary, project, registry, tmp_path, chain)

    # The lockfile never names the upstream: every tarball URL the client saw points at the hub.
    lockfile = (project / ("pnpm-lock.yaml" if client == "pnpm" else "yarn.lock")).read_text()
    assert verdaccio.url.split("//", 1)[1].rstrip("/") not in lockfile
    if client == "yarn":
        assert f"{server.url}/registries/proxy/" in lockfile
    leaf = chain[2]
    assert verdaccio.request_count(f"/{leaf}/-/{leaf}-1.0.1.tgz") == 1
