"""The registry-format contract (`batlehub.testing.format_contract`), kept by npm: publishes,
ownership, scopes, quota, audit and events, driven the way the npm CLI drives a registry."""

from __future__ import annotations

import json
from typing import Any

from aiohttp.test_utils import TestClient
from npm_testdata import publish_body

from batlehub.testing.format_contract import RegistryFormatContract


def escaped(name: str) -> str:
    return name.replace("/", "%2f")


class TestNpmFormatContract(RegistryFormatContract):
    registry_type = "npm"

    def package_name(self, stem: str) -> str:
        return f"contract-{stem}"

    def scoped_name(self, scope: str, stem: str) -> str | None:
        return f"@{scope}/{stem}"

    async def publish(self, client: TestClient, registry: str, token: str, name: str, version: str) -> int:
        async with client.put(
            f"/registries/{registry}/{escaped(name)}",
            data=json.dumps(publish_body(name, version)),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        ) as response:
            return response.status

    async def versions(self, client: TestClient, registry: str, name: str) -> list[str] | None:
        async with client.get(f"/registries/{registry}/{escaped(name)}") as response:
            if response.status == 404:
                return None
            assert response.status == 200, await response.text()
            return list((await response.json())["versions"])

    async def unpublish(self, client: TestClient, registry: str, token: str, name: str, version: str) -> int:
        """What `npm unpublish name@version` sends: the current document, then that document
        without the version under its `-rev` (the request that decides)."""
        headers = {"Authorization": f"Bearer {token}"}
        async with client.get(f"/registries/{registry}/{escaped(name)}?write=true", headers=headers) as response:
            assert response.status == 200, await response.text()
            doc: dict[str, Any] = await response.json()
        doc["versions"].pop(version)
        doc["dist-tags"] = {tag: v for tag, v in doc["dist-tags"].items() if v != version}
        async with client.put(
            f"/registries/{registry}/{escaped(name)}/-rev/{doc['_rev']}",
            data=json.dumps(doc),
            headers={**headers, "Content-Type": "application/json"},
        ) as response:
            return response.status
