"""The PyPI format on the production backends: PostgreSQL, Redis and S3 (SeaweedFS) with
downloads redirected to presigned URLs. twine uploads, pip (with `--require-hashes`) and uv
install, and the hub reports itself healthy: nothing in the format assumes the embedded defaults."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from batlehub_pypi_testing.clients import client_env, ok, pip_install, twine_upload, uv_pip_install
from batlehub_pypi_testing.packages import write_wheel

from batlehub.testing.hub import HubFactory, token_auth_toml

pytestmark = [pytest.mark.pypi_cli]

TOKEN = "backends-alice-token-0123456789"


async def test_upload_and_install_on_postgres_redis_and_s3(
    hub: HubFactory, fresh_postgres_url: str, redis_url: str, s3_config: dict[str, Any], tmp_path: Path
) -> None:
    s3 = {**s3_config, "prefix": f"pypi-{uuid.uuid4().hex[:8]}/", "redirect_downloads": True}
    storage = "\n".join(f"{key} = {json.dumps(value)}" for key, value in s3.items())
    server = await hub(
        f"""{token_auth_toml({"alice": (TOKEN, "user")})}
[database]
type = "postgresql"
url = "{fresh_postgres_url}"
[cache]
type = "redis"
url = "{redis_url}"
[storage]
type = "s3"
{storage}
[[registries]]
type = "pypi"
name = "pypi"
mode = "local"
"""
    )
    wheels = [
        write_wheel("backend-leaf", "1.0", tmp_path / "d"),
        write_wheel("backend-app", "1.0", tmp_path / "d", dependencies=["backend-leaf"]),
    ]
    ok(twine_upload(f"{server.url}/registries/pypi/", wheels, client_env(tmp_path), TOKEN))

    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        "".join(
            f"{w.name.split('-')[0]}==1.0 --hash=sha256:{hashlib.sha256(w.read_bytes()).hexdigest()}\n" for w in wheels
        )
    )
    index = f"{server.url}/registries/pypi/simple/"
    ok(pip_install(index, ["--require-hashes", "-r", str(requirements)], tmp_path / "pip", client_env(tmp_path)))
    ok(uv_pip_install(index, ["backend-app"], tmp_path / "uv", client_env(tmp_path)))
    for target in ("pip", "uv"):
        assert sorted(p.name for p in (tmp_path / target).glob("*.dist-info")) == [
            "backend_app-1.0.dist-info",
            "backend_leaf-1.0.dist-info",
        ]
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/api/v1/admin/health") as response:
        assert (await response.json())["status"] == "ok"
