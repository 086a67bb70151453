"""The PyPI protocol in process: the simple index's two forms and their negotiation, name
normalization, PEP 658/700/592 fields, the JSON API, the upload checks, yank and delete."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pypi_testdata import basic, upload_form, wheel_bytes
from yarl import URL

from batlehub.app import create_app
from batlehub.config import parse_settings

ALICE = "api-alice-token-0123456789"
BOB = "api-bob-token-0123456789"
ADMIN = "api-admin-token-0123456789"
JSON_TYPE = "application/vnd.pypi.simple.v1+json"


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> TestClient:
    every = ["releases:read", "source:read", "releases:publish", "releases:delete"]
    raw = {
        "auth": [
            {
                "type": "token",
                "tokens": [
                    {"value": ALICE, "role": "user", "user_id": "alice"},
                    {"value": BOB, "role": "user", "user_id": "bob"},
                    {"value": ADMIN, "role": "admin", "user_id": "admin"},
                ],
            }
        ],
        "registries": [
            {"type": "pypi", "name": "py", "mode": "local", "rbac": {"user": every}},
            {"type": "pypi", "name": "mirror", "mode": "proxy", "upstreams": ["http://127.0.0.1:9/simple/"]},
        ],
    }
    return await aiohttp_client(create_app(parse_settings(raw, data_dir=tmp_path / "data")))  # type: ignore[no-any-return]


async def upload(client: TestClient, name: str, version: str, **kwargs: Any) -> tuple[int, str]:
    filename, data = wheel_bytes(name, version, dependencies=kwargs.pop("dependencies", ()))
    filename = kwargs.pop("filename", filename)
    data = kwargs.pop("data", data)
    async with client.post(
        "/registries/py/legacy/", data=upload_form(name, version, filename, data, **kwargs), headers=basic(ALICE)
    ) as response:
        return response.status, await response.text()


async def test_a_project_page_in_both_forms_with_hashes_metadata_and_pep_700_fields(client: TestClient) -> None:
    assert (await upload(client, "Demo_Pkg", "1.0", dependencies=("requests>=2",)))[0] == 200
    async with client.get("/registries/py/simple/demo-pkg/", headers={"Accept": JSON_TYPE}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == JSON_TYPE and "Accept" in response.headers["Vary"]
        page = await response.json()
    assert page["meta"]["api-version"] == "1.1" and page["name"] == "Demo_Pkg" and page["versions"] == ["1.0"]
    (item,) = page["files"]
    assert item["filename"] == "demo_pkg-1.0-py3-none-any.whl" and len(item["hashes"]["sha256"]) == 64
    assert item["size"] > 0 and item["upload-time"].endswith("Z") and "yanked" not in item
    assert item["core-metadata"] == item["dist-info-metadata"]

    async with client.get(URL(item["url"]).path) as response:
        assert hashlib.sha256(await response.read()).hexdigest() == item["hashes"]["sha256"]
    async with client.get(URL(item["url"]).path + ".metadata") as response:
        metadata = await response.read()
    assert hashlib.sha256(metadata).hexdigest() == item["core-metadata"]["sha256"]
    assert b"Requires-Dist: requests>=2" in metadata

    async with client.get("/registries/py/simple/demo-pkg/") as response:  # no Accept: HTML
        assert response.headers["Content-Type"].startswith("text/html")
        html = await response.text()
    assert f"#sha256={item['hashes']['sha256']}" in html
    assert f'data-core-metadata="sha256={item["core-metadata"]["sha256"]}"' in html
    assert 'data-dist-info-metadata="sha256=' in html

    async with client.get("/registries/py/simple/demo-pkg/", headers={"Accept": "application/xml"}) as response:
        assert response.status == 406
    async with client.get("/registries/py/simple/demo-pkg/?format=json") as response:
        assert response.headers["Content-Type"] == JSON_TYPE


async def test_names_redirect_to_their_normalized_page(client: TestClient) -> None:
    assert (await upload(client, "demo-pkg", "1.0"))[0] == 200
    for path in (
        "/registries/py/simple/Demo.Pkg/",
        "/registries/py/simple/demo_pkg/",
        "/registries/py/simple/demo-pkg",
    ):
        async with client.get(path, allow_redirects=False) as response:
            assert response.status == 301, path
            assert response.headers["Location"].endswith("/registries/py/simple/demo-pkg/")
    async with client.get("/registries/py/simple/", headers={"Accept": JSON_TYPE}) as response:
        assert {p["name"] for p in (await response.json())["projects"]} == {"demo-pkg"}


async def test_etag_gives_304(client: TestClient) -> None:
    assert (await upload(client, "etag-pkg", "1.0"))[0] == 200
    async with client.get("/registries/py/simple/etag-pkg/") as response:
        etag = response.headers["ETag"]
    async with client.get("/registries/py/simple/etag-pkg/", headers={"If-None-Match": etag}) as response:
        assert response.status == 304


async def test_the_json_api_gives_304_until_a_write_changes_it(client: TestClient) -> None:
    assert (await upload(client, "etag-api", "1.0"))[0] == 200
    url = "/registries/py/pypi/etag-api/json"
    async with client.get(url, headers={"Accept-Encoding": "gzip"}) as response:
        etag = response.headers["ETag"]
        assert list((await response.json())["releases"]) == ["1.0"]
    async with client.get("/registries/py/pypi/etag-api/1.0/json") as response:
        release_etag = response.headers["ETag"]
        assert release_etag != etag
    for path, known in ((url, etag), ("/registries/py/pypi/etag-api/1.0/json", release_etag)):
        async with client.get(path, headers={"If-None-Match": known}) as response:
            assert response.status == 304 and response.headers["ETag"] == known
    async with client.get("/registries/py/pypi/etag-api/2.0/json") as response:
        assert response.status == 404
    assert (await upload(client, "etag-api", "2.0"))[0] == 200
    async with client.get(url, headers={"If-None-Match": etag}) as response:
        assert response.status == 200 and response.headers["ETag"] != etag
        assert list((await response.json())["releases"]) == ["1.0", "2.0"]
    async with client.get("/registries/py/pypi/etag-api/2.0/json") as response:
        assert response.status == 200 and (await response.json())["info"]["version"] == "2.0"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sha256": "0" * 64}, "does not match its sha256_digest"),
        ({"filename": "other-1.0-py3-none-any.whl"}, "does not belong to project"),
        ({"filename": "checked-2.0-py3-none-any.whl"}, "does not belong to version"),
        ({"filename": "checked-1.0.exe"}, "unsupported file type"),
        ({"filetype": "sdist"}, "does not match the file"),
        ({"data": b"not a zip"}, "not a valid wheel"),
        ({"extra": {"requires_dist": "not a [requirement"}}, "invalid metadata"),
        ({"extra": {":action": "submit"}}, "unsupported :action"),
    ],
)
async def test_uploads_are_checked_before_anything_is_stored(
    client: TestClient, change: dict[str, Any], message: str
) -> None:
    status, body = await upload(client, "checked", "1.0", **change)
    assert status in (400, 422) and message in json.loads(body)["error"], body
    async with client.get("/registries/py/pypi/checked/json") as response:
        assert response.status == 404


async def test_several_files_per_release_and_a_duplicate_is_refused(client: TestClient) -> None:
    assert (await upload(client, "multi", "1.0"))[0] == 200
    sdist = b"\x1f\x8b fake sdist bytes"
    status, _ = await upload(client, "multi", "1.0", filename="multi-1.0.tar.gz", data=sdist, filetype="sdist")
    assert status == 200
    status, body = await upload(client, "multi", "1.0", filename="multi-1.0.tar.gz", data=sdist, filetype="sdist")
    assert status == 400 and "File already exists" in body
    async with client.get("/registries/py/pypi/multi/json") as response:
        doc = await response.json()
    assert sorted(f["packagetype"] for f in doc["releases"]["1.0"]) == ["bdist_wheel", "sdist"]
    assert doc["info"]["version"] == "1.0" and doc["info"]["name"] == "multi"
    async with client.get("/registries/py/pypi/multi/1.0/json") as response:
        assert len((await response.json())["urls"]) == 2


async def test_yank_unyank_and_delete(client: TestClient) -> None:
    for version in ("1.0", "2.0"):
        assert (await upload(client, "yanky", version))[0] == 200
    async with client.post(
        "/registries/py/pypi/yanky/2.0/yank", json={"reason": "broken build"}, headers=basic(BOB)
    ) as response:
        assert response.status == 403  # not an owner
    async with client.post(
        "/registries/py/pypi/yanky/2.0/yank", json={"reason": "broken build"}, headers=basic(ALICE)
    ) as response:
        assert response.status == 200
    async with client.get("/registries/py/simple/yanky/", headers={"Accept": JSON_TYPE}) as response:
        files = {f["filename"]: f for f in (await response.json())["files"]}
    assert files["yanky-2.0-py3-none-any.whl"]["yanked"] == "broken build"
    assert "yanked" not in files["yanky-1.0-py3-none-any.whl"]
    async with client.get("/registries/py/simple/yanky/") as response:
        assert 'data-yanked="broken build"' in await response.text()
    async with client.get("/registries/py/pypi/yanky/json") as response:
        assert (await response.json())["info"]["version"] == "1.0"  # a yanked release is not the latest

    async with client.post("/registries/py/pypi/yanky/2.0/unyank", headers=basic(ALICE)) as response:
        assert response.status == 200
    async with client.get("/registries/py/pypi/yanky/json") as response:
        assert (await response.json())["info"]["version"] == "2.0"

    usage = "/api/v1/admin/quota/py/alice"
    async with client.get(usage, headers=basic(ADMIN)) as response:
        before = (await response.json())["used_bytes"]
    async with client.delete("/registries/py/files/yanky/yanky-2.0-py3-none-any.whl", headers=basic(ALICE)) as response:
        assert response.status == 200
    async with client.get(usage, headers=basic(ADMIN)) as response:
        after = await response.json()
    assert 0 < after["used_bytes"] < before and after["used_versions"] == 2  # the bytes go back, the release stays
    async with client.get("/registries/py/files/yanky/yanky-2.0-py3-none-any.whl.metadata") as response:
        assert response.status == 404  # its core metadata went with it
    async with client.delete("/registries/py/pypi/yanky/1.0/", headers=basic(ALICE)) as response:
        assert response.status == 200
    async with client.get("/registries/py/pypi/yanky/json") as response:
        assert list((await response.json())["releases"]) == ["2.0"]


async def test_a_proxy_refuses_uploads(client: TestClient) -> None:
    filename, data = wheel_bytes("anything", "1.0")
    async with client.post(
        "/registries/mirror/", data=upload_form("anything", "1.0", filename, data), headers=basic(ALICE)
    ) as response:
        assert response.status == 405


async def test_upload_without_credentials_asks_for_basic_auth(client: TestClient) -> None:
    filename, data = wheel_bytes("anon", "1.0")
    async with client.post("/registries/py/", data=upload_form("anon", "1.0", filename, data)) as response:
        assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
