"""Attacks with documents: each test is a request an attacker (or a broken client) sent, which
used to break a package for good or answer 500. Every one now gets a 4xx, stores nothing, and the
package keeps serving."""

from __future__ import annotations

import json
import time
from typing import Any

from npm_testdata import ADMIN, ALICE, auth, publish_body

DEEP = "[" * 5000 + "]" * 5000
"""Deeper than Python's json module can decode (RecursionError)."""


def nested(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = {"x": value}
    return value


async def put(client: Any, name: str, body: bytes, token: str = ALICE) -> Any:
    return await client.put(f"/registries/npm/{name.replace('/', '%2f')}", data=body, headers=auth(token))


async def readable(client: Any, name: str) -> None:
    """Every document form of `name` still answers (the package is not broken)."""
    for path, headers in (
        (f"/registries/npm/{name}", {}),
        (f"/registries/npm/{name}", {"Accept": "application/vnd.npm.install-v1+json"}),
        (f"/registries/npm/{name}?write=true", auth(ALICE)),
        (f"/registries/npm/{name}/latest", {}),
    ):
        response = await client.get(path, headers=headers)
        assert response.status == 200, (path, await response.text())


async def test_a_lone_surrogate_in_a_manifest_is_refused_and_breaks_nothing(client: Any) -> None:
    assert (await put(client, "sur", json.dumps(publish_body("sur", "1.0.0")).encode())).status == 201
    for field, value in (("description", "\ud800"), ("keywords", ["ok", "\udfff"]), ("readme", "a\ud83d")):
        body = json.dumps(publish_body("sur", "1.1.0", **{field: value})).encode()  # ensure_ascii: "\\ud800"
        assert b"\\ud" in body
        response = await put(client, "sur", body)
        assert response.status == 400, (field, await response.text())
        assert "surrogate" in (await response.json())["error"]
        await readable(client, "sur")
    # A lone surrogate as a key, and in a deprecation message (a whole-document PUT).
    body = json.dumps(publish_body("sur", "1.1.0", scripts={"\ud800": "x"})).encode()
    assert (await put(client, "sur", body)).status == 400
    doc = await (await client.get("/registries/npm/sur?write=true", headers=auth(ALICE))).json()
    doc["versions"]["1.0.0"]["deprecated"] = "\udc00"
    assert (await put(client, "sur", json.dumps(doc).encode())).status == 400
    await readable(client, "sur")
    # Valid pairs are text like any other.
    body = json.dumps(publish_body("sur", "1.2.0", description="emoji \U0001f600")).encode()
    assert (await put(client, "sur", body)).status == 201
    assert (await (await client.get("/registries/npm/sur")).json())["description"] == "emoji \U0001f600"


async def test_a_deeply_nested_manifest_is_refused(client: Any) -> None:
    assert (await put(client, "deep", json.dumps(publish_body("deep", "1.0.0")).encode())).status == 201
    for levels in (100, 900):
        body = json.dumps(publish_body("deep", "1.1.0", config=nested(levels))).encode()
        response = await put(client, "deep", body)
        assert response.status == 400 and "nested" in (await response.json())["error"], levels
    await readable(client, "deep")


async def test_json_deeper_than_the_decoder_is_a_400_everywhere(client: Any) -> None:
    deep = DEEP.encode()
    for method, path, token in (
        ("PUT", "/registries/npm/deepest", ALICE),  # publish
        ("PUT", "/registries/npm/-/package/deepest/dist-tags/next", ALICE),
        ("PUT", "/registries/npm/-/user/org.couchdb.user:x", None),  # anonymous login
        ("PUT", "/api/v1/admin/banner", ADMIN),
        ("POST", "/api/v1/admin/tokens", ADMIN),
    ):
        body = deep if "user" not in path else json.dumps({"password": "x"}).encode()[:-1] + b',"n":' + deep + b"}"
        response = await client.request(method, path, data=body, headers=auth(token) if token else {})
        assert 400 <= response.status < 500, (path, response.status, await response.text())


async def test_millions_of_empty_arrays_are_refused_quickly(client: Any) -> None:
    """20 MB of `[],` used to take 17 s and 570 MB of memory before a 404."""
    started = time.monotonic()
    body = b'{"name":"lists","x":[' + b"[]," * 7_000_000 + b'[]],"versions":{}}'
    response = await put(client, "lists", body)
    assert response.status == 400 and "objects and arrays" in (await response.json())["error"]
    assert time.monotonic() - started < 10


async def test_an_integrity_of_the_wrong_length_is_a_400(client: Any) -> None:
    for integrity in ("sha512-AAAA", "sha512-" + "A" * 500, "sha1-AAAA"):
        body = publish_body("short-sri", "1.0.0")
        body["versions"]["1.0.0"]["dist"]["integrity"] = integrity
        response = await put(client, "short-sri", json.dumps(body).encode())
        assert response.status == 400 and "SRI" in (await response.json())["error"], integrity
