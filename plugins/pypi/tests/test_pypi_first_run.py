"""A newcomer's first run with the PyPI plugin: `batlehub serve` with no config at all proxies the
index the user's pip is configured with (here a local pypiserver, named in the user's pip.conf),
the start-up log names that upstream and the pip.conf lines to paste, and those lines are all a
real pip needs to install through the hub. A pip already pointing at the hub makes no loop."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from batlehub_pypi_testing.clients import client_env, ok, pip
from batlehub_pypi_testing.packages import write_wheel

from batlehub.testing.hub import HubFactory


def user_env(tmp_path: Path, index_url: str) -> dict[str, str]:
    """The hub's environment: a user whose pip.conf names `index_url`, nothing else set."""
    conf = tmp_path / f"pip-{uuid.uuid4().hex[:6]}.conf"
    conf.write_text(f"[global]\nindex-url = {index_url}\n")
    # The user's pip is the one installed beside this interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {"PIP_INDEX_URL": "", "PIP_CONFIG_FILE": str(conf), "PATH": path}


def pasted_pip_conf(logs: str) -> str:
    """The pip.conf the start-up log tells the user to write (its `[global]` and `index-url` lines)."""
    lines = [line.split(": ", 2)[-1].strip() for line in logs.splitlines()]
    start = lines.index("[global]")
    assert lines[start + 1].startswith("index-url = "), logs
    return "\n".join(lines[start : start + 2]) + "\n"


async def test_the_embedded_default_proxies_the_index_pip_already_uses(
    tmp_path: Path, hub: HubFactory, pypiserver: Any
) -> None:
    name = f"first-run-{uuid.uuid4().hex[:8]}"
    pypiserver.upload([write_wheel(name, "1.2.3", tmp_path / "dist")])
    server = await hub(None, env=user_env(tmp_path, pypiserver.index_url))
    logs = server.logs()
    assert f"registry pypi: proxying {pypiserver.index_url}, the index your pip uses" in logs, logs
    assert f"upstream: {pypiserver.index_url}" in logs
    assert f"UV_DEFAULT_INDEX={server.url}/registries/pypi/simple/" in logs
    conf = pasted_pip_conf(logs)
    assert conf == f"[global]\nindex-url = {server.url}/registries/pypi/simple/\n"

    env = client_env(tmp_path)
    (tmp_path / "user-pip.conf").write_text(conf)
    env["PIP_CONFIG_FILE"] = str(tmp_path / "user-pip.conf")  # only the pasted lines
    target = tmp_path / "site"
    ok(await asyncio.to_thread(pip, ["install", "--target", str(target), f"{name}==1.2.3"], env))
    assert (target / name.replace("-", "_") / "__init__.py").read_text().startswith('VERSION = "1.2.3"')


async def test_a_pip_already_pointing_at_the_hub_makes_no_loop(tmp_path: Path, hub: HubFactory) -> None:
    server = await hub(None)  # the harness points pip at the hub itself
    logs = server.logs()
    assert "registry pypi: your pip already uses this hub" in logs and "nothing is proxied" in logs, logs
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/registries/pypi/simple/not-here/") as response:
            assert response.status == 404
