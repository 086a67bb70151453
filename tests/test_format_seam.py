"""A second registry format, written here against `batlehub.api` alone, keeps the same contract as
npm: the seam carries a format without copying anything from another one.

The "blobs" format is as small as a format gets: `PUT /{name}/{version}` stores the body as the
version's one file, `GET /{name}` lists versions, `GET /{name}/{version}` downloads, `DELETE
/{name}/{version}` unpublishes. Its names may be scoped (`~scope.name`), to exercise scope owners.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from batlehub import api
from batlehub.plugins import get_plugin_manager
from batlehub.testing.format_contract import RegistryFormatContract

_NAME = re.compile(r"^(~[a-z0-9-]+\.)?[a-z0-9][a-z0-9-]*$")
_VERSION = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")


def _checked(name: str, version: str | None = None) -> tuple[str, str | None]:
    if not _NAME.match(name) or (version is not None and not _VERSION.match(version)):
        raise api.BadRequest(f"invalid name or version {name!r} {version!r}")
    return name, version


def scope_of(name: str) -> str | None:
    return name.split(".", 1)[0] if name.startswith("~") else None


class BlobsOptions(api.ConfigModel):
    mode: str = "local"


class BlobsRegistry:
    def __init__(self, settings: api.RegistrySettings, services: api.RegistryServices) -> None:
        self.name = settings.name
        self.services = services
        self.options = settings.validated_options(BlobsOptions)

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{name}", self.list_versions)
        app.router.add_put("/{name}/{version}", self.publish)
        app.router.add_get("/{name}/{version}", self.download)
        app.router.add_delete("/{name}/{version}", self.unpublish)
        return app

    async def startup(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def list_versions(self, request: web.Request) -> web.Response:
        api.require(request, "releases:read")
        name, _ = _checked(request.match_info["name"])
        package = await self.services.packages.load(name)
        if package is None:
            raise api.NotFound(f"no package {name}")
        return web.json_response({"versions": [v.version for v in package.versions]})

    async def publish(self, request: web.Request) -> web.Response:
        api.require(request, "releases:publish")
        name, version = _checked(request.match_info["name"], request.match_info["version"])
        assert version is not None
        body = await api.read_body(request, 1024 * 1024)

        async def chunks() -> AsyncIterator[bytes]:
            yield body

        blob = await self.services.artifacts.put(chunks(), {"sha512": hashlib.sha512(body).hexdigest()})
        async with self.services.packages.write(name, api.actor(request), create=True) as tx:
            await tx.add_version(version, {"size": blob.size}, [api.NewFile(f"{version}.bin", blob)])
            tx.describe(target=f"{name}@{version}")
        return web.json_response({"ok": True}, status=201)

    async def download(self, request: web.Request) -> web.StreamResponse:
        api.require(request, "source:read")
        name, version = _checked(request.match_info["name"], request.match_info["version"])
        found = await self.services.packages.file(name, version=version)
        if found is None:
            raise api.NotFound(f"no {name}@{version}")
        return await self.services.artifacts.response(request, found.key, found.filename)

    async def unpublish(self, request: web.Request) -> web.Response:
        api.require(request, "releases:delete")
        name, version = _checked(request.match_info["name"], request.match_info["version"])
        assert version is not None
        async with self.services.packages.write(name, api.actor(request), permission="releases:delete") as tx:
            if not await tx.remove_version(version):
                raise api.NotFound(f"no {name}@{version}")
            tx.describe(target=f"{name}@{version}")
        return web.json_response({"ok": True})


class BlobsPlugin:
    @api.hookimpl
    def register_registry_formats(self) -> list[api.RegistryFormatType]:
        return [
            api.RegistryFormatType(
                name="blobs",
                description="files by name and version (a test format)",
                config_model=BlobsOptions,
                factory=BlobsRegistry,
                scope_of=scope_of,
            )
        ]


@pytest.fixture(autouse=True)
def blobs_format(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every plugin manager built during a test knows the blobs format."""
    real = get_plugin_manager

    def with_blobs(load_entrypoints: bool = True) -> Any:
        pm = real(load_entrypoints)
        pm.register(BlobsPlugin(), name="blobs-format")
        return pm

    monkeypatch.setattr("batlehub.testing.format_contract.get_plugin_manager", with_blobs)
    yield


class TestBlobsFormatContract(RegistryFormatContract):
    registry_type = "blobs"

    def package_name(self, stem: str) -> str:
        return stem

    def scoped_name(self, scope: str, stem: str) -> str | None:
        return f"~{scope}.{stem}"

    async def publish(self, client: TestClient, registry: str, token: str, name: str, version: str) -> int:
        async with client.put(
            f"/registries/{registry}/{name}/{version}",
            data=f"{name}@{version}".encode(),
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            return response.status

    async def versions(self, client: TestClient, registry: str, name: str) -> list[str] | None:
        async with client.get(f"/registries/{registry}/{name}") as response:
            if response.status == 404:
                return None
            versions = (await response.json())["versions"]
        for version in versions:  # every listed version downloads, with its own bytes
            async with client.get(f"/registries/{registry}/{name}/{version}") as download:
                assert download.status == 200 and await download.read() == f"{name}@{version}".encode()
        return list(versions)

    async def unpublish(self, client: TestClient, registry: str, token: str, name: str, version: str) -> int:
        async with client.delete(
            f"/registries/{registry}/{name}/{version}", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            return response.status
