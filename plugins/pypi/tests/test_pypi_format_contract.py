"""The registry-format contract (`batlehub.testing.format_contract`), kept by the PyPI format:
publishes, ownership, quota, audit and events, driven the way twine drives an index."""

from __future__ import annotations

import hashlib

from aiohttp.test_utils import TestClient
from pypi_testdata import basic, upload_form, wheel_bytes
from yarl import URL

from batlehub.testing.format_contract import RegistryFormatContract


class TestPypiFormatContract(RegistryFormatContract):
    registry_type = "pypi"
    duplicate_publish_status = 400  # PyPI's "File already exists", which twine --skip-existing knows

    def package_name(self, stem: str) -> str:
        return f"contract-{stem}"

    async def publish(self, client: TestClient, registry: str, token: str, name: str, version: str) -> int:
        filename, data = wheel_bytes(name, version)
        async with client.post(
            f"/registries/{registry}/", data=upload_form(name, version, filename, data), headers=basic(token)
        ) as response:
            return response.status

    async def versions(self, client: TestClient, registry: str, name: str) -> list[str] | None:
        async with client.get(f"/registries/{registry}/pypi/{name}/json") as response:
            if response.status == 404:
                return None
            assert response.status == 200, await response.text()
            releases = (await response.json())["releases"]
        for files in releases.values():  # every listed file downloads, with the bytes its digest says
            for item in files:
                async with client.get(URL(item["url"]).path) as download:
                    assert download.status == 200
                    assert hashlib.sha256(await download.read()).hexdigest() == item["digests"]["sha256"]
        return list(releases)

    async def unpublish(self, client: TestClient, registry: str, token: str, name: str, version: str) -> int:
        async with client.delete(f"/registries/{registry}/pypi/{name}/{version}/", headers=basic(token)) as response:
            return response.status
