"""A proxy in front of an index that serves PEP 691 JSON and `.metadata` files (another hub's
local registry): the upstream's core metadata is proxied and verified, `upload-time` and yanks
are kept, and uv resolves through the proxy without either hub fetching a wheel."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from batlehub_pypi_testing.clients import client_env, ok, twine_upload, uv
from batlehub_pypi_testing.packages import write_wheel

from batlehub.testing.hub import Hub, HubFactory, token_auth_toml
from batlehub.testing.services import run_coroutine_sync

pytestmark = [pytest.mark.pypi_cli]

TOKEN = "chain-alice-token-0123456789"
JSON_TYPE = "application/vnd.pypi.simple.v1+json"


@pytest.fixture(scope="module")
def hubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hub, Hub]]:
    factory = HubFactory(tmp_path_factory.mktemp("chain"))
    auth = token_auth_toml({"alice": (TOKEN, "user")})
    try:
        upstream = run_coroutine_sync(
            lambda: factory(f'{auth}\n[[registries]]\ntype = "pypi"\nname = "up"\nmode = "local"\n')
        )
        index = f"{upstream.url}/registries/up/simple/"
        proxy = run_coroutine_sync(
            lambda: factory(
                f'[[registries]]\ntype = "pypi"\nname = "mirror"\nmode = "proxy"\nupstreams = ["{index}"]\n'
            )
        )
        yield upstream, proxy
    finally:
        factory.stop_all()


def page(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": JSON_TYPE})) as response:
        return dict(json.load(response))


def test_core_metadata_comes_through_a_proxy_verified(hubs: tuple[Hub, Hub], tmp_path: Path) -> None:
    upstream, proxy = hubs
    env = client_env(tmp_path)
    wheels = [
        write_wheel("chain-leaf", "1.0", tmp_path / "d"),
        write_wheel("chain-app", "1.0", tmp_path / "d", dependencies=["chain-leaf"]),
    ]
    ok(twine_upload(f"{upstream.url}/registries/up/", wheels, env, TOKEN))
    mirror = f"{proxy.url}/registries/mirror/simple/"
    up_files = {f["filename"]: f for f in page(f"{upstream.url}/registries/up/simple/chain-app/")["files"]}
    files = {f["filename"]: f for f in page(mirror + "chain-app/")["files"]}
    assert files.keys() == up_files.keys()
    for name, item in files.items():
        assert item["url"].startswith(proxy.url) and item["hashes"] == up_files[name]["hashes"]
        assert item["core-metadata"] == up_files[name]["core-metadata"]
        assert item["upload-time"] == up_files[name]["upload-time"]

    since_up, since_proxy = len(upstream.logs()), len(proxy.logs())
    requirements = tmp_path / "requirements.in"
    requirements.write_text("chain-app\n")
    resolved = ok(uv(["pip", "compile", "--no-cache", "--index-url", mirror, str(requirements)], client_env(tmp_path)))
    assert "chain-leaf==1.0" in resolved, resolved
    for hub, since in ((proxy, since_proxy), (upstream, since_up)):
        lines = [line for line in hub.logs()[since:].splitlines() if "batlehub.access" in line]
        assert any(".whl.metadata 200" in line for line in lines), lines
        assert not any(".whl 200" in line or ".whl 206" in line for line in lines), lines
