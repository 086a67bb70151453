"""Attacks on the core pipeline, each written as what an attacker (or a broken client) sent.

Against a real `batlehub serve` where the connection itself is the attack (silent and half-sent
requests, malformed HTTP, bytes that are not UTF-8); in process for the rest. Each of these used
to succeed or answer 500 (security review, issue 11)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from batlehub import appkeys
from batlehub.app import create_app
from batlehub.config import parse_settings
from batlehub.net import client_ip
from batlehub.testing.hub import Hub, HubFactory, token_auth_toml

ADMIN = "hostile-admin-token-0123456789"
ALICE = "hostile-alice-token-0123456789"
TOKENS = {"admin": (ADMIN, "admin"), "alice": (ALICE, "user")}


# --- the connection as the attack ----------------------------------------------------------------


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Hub]:
    factory = HubFactory(tmp_path)
    config = token_auth_toml(TOKENS) + (
        "\n[limits]\nheader_timeout_secs = 1\nbody_idle_timeout_secs = 1\n"
        '\n[[registries]]\ntype = "npm"\nname = "npm"\nmode = "local"\n'
    )
    try:
        yield await factory(config)
    finally:
        factory.stop_all()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


async def raw(hub: Hub, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(65536), within) == b""
    except (TimeoutError, ConnectionResetError):
        return False


async def health(hub: Hub) -> tuple[int, float]:
    started = time.monotonic()
    reader, writer = await raw(hub, b"GET /api/v1/admin/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, _, _ = await answer(reader)
    writer.close()
    return status, time.monotonic() - started


async def test_silent_and_half_sent_requests_are_closed(serve: Hub) -> None:
    silent, _ = await raw(serve, b"")
    half_headers, _ = await raw(serve, b"GET /api/v1/banner HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    half_body, _ = await raw(
        serve,
        b"PUT /registries/npm/slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + ALICE.encode()
        + b'\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"name":',
    )
    assert await closed_by_server(silent, within=5)
    assert await closed_by_server(half_headers, within=5)
    status, headers, body = await answer(half_body)
    assert status == 408 and json.loads(body)["error"].startswith("no request body bytes for 1s")
    assert headers.get("connection", "").lower() == "close"
    # aiohttp lingers up to 10 s for the rest of the body, so the client surely reads the answer.
    assert await closed_by_server(half_body, within=15)


async def test_hundreds_of_slow_clients_do_not_stop_anyone_else(serve: Hub) -> None:
    """The review's 1,100 half-requests locked every client out (health included) for good."""
    openers = [raw(serve, b"GET /registries/npm/x HTTP/1.1\r\nHost: x\r\n") for _ in range(300)]
    openers += [raw(serve, b"") for _ in range(200)]
    slow = await asyncio.gather(*openers)
    try:
        status, took = await health(serve)
        assert status == 200 and took < 2, took
        # What an install does: a publish's packument, then its tarball, while the slow ones wait.
        tarball = b"\x1f\x8b" + os.urandom(2000)
        body = json.dumps(
            {
                "_id": "busy",
                "name": "busy",
                "versions": {"1.0.0": {"name": "busy", "version": "1.0.0", "dist": {"integrity": sri(tarball)}}},
                "_attachments": {"busy-1.0.0.tgz": {"data": base64.b64encode(tarball).decode()}},
            }
        ).encode()
        async with aiohttp.ClientSession(serve.url) as session:
            async with session.put("/registries/npm/busy", data=body, headers=bearer(ALICE)) as published:
                assert published.status == 201
            async with session.get("/registries/npm/busy") as packument:
                url = (await packument.json())["versions"]["1.0.0"]["dist"]["tarball"]
            async with session.get(url) as download:
                assert download.status == 200 and await download.read() == tarball
        closed = await asyncio.gather(*(closed_by_server(r, within=8) for r, _ in slow))
        assert all(closed), f"{closed.count(False)} of {len(closed)} slow connections still open"
    finally:
        for _, writer in slow:
            writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03<script>\r\n\r\n",
    ],
)
async def test_malformed_http_gets_a_json_error_that_echoes_nothing(serve: Hub, request_bytes: bytes) -> None:
    reader, writer = await raw(serve, request_bytes)
    status, headers, body = await answer(reader)
    writer.close()
    assert 400 <= status < 500 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"].startswith("malformed HTTP request")
    assert b"aaaa" not in body and b"script" not in body and b"BREW" not in body


async def test_a_token_that_is_not_utf8_is_a_401(serve: Hub) -> None:
    reader, writer = await raw(
        serve, b"GET /registries/npm/-/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xfd\r\n\r\n"
    )
    status, _, body = await answer(reader)
    writer.close()
    assert status == 401 and "error" in json.loads(body)


# --- in process --------------------------------------------------------------------------------


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> Any:
    raw_settings = {
        "server": {"trusted_proxies": ["127.0.0.0/8"], "cors_allowed_origins": ["https://ui.test"]},
        "auth": [{"type": "token", "tokens": [{"value": t, "role": r, "user_id": u} for u, (t, r) in TOKENS.items()]}],
        "registries": [{"type": "npm", "name": "npm", "mode": "local"}],
    }
    return await aiohttp_client(create_app(parse_settings(raw_settings, data_dir=tmp_path / "data")))


async def audit(client: Any, query: str = "") -> list[dict[str, Any]]:
    response = await client.get(f"/api/v1/admin/audit-log?limit=1000&{query}", headers=bearer(ADMIN))
    assert response.status == 200
    entries: list[dict[str, Any]] = (await response.json())["entries"]
    return entries


def test_every_forwarded_for_line_counts() -> None:
    """A proxy that appends its own line (HAProxy's `option forwardfor`) leaves the client's
    forged line first: the address is still the one the proxy saw."""
    headers = CIMultiDict([("X-Forwarded-For", "9.9.9.9, 127.0.0.50"), ("X-Forwarded-For", "203.0.113.7")])
    from ipaddress import ip_network

    assert client_ip("127.0.0.9", headers, [ip_network("127.0.0.0/8")]) == "203.0.113.7"


async def test_a_block_of_an_ipv4_mapped_address_blocks_it(client: Any) -> None:
    added = await client.post("/api/v1/admin/ip-blocks", headers=bearer(ADMIN), json={"ip": "::ffff:198.51.100.9"})
    assert added.status == 201 and (await added.json())["ip"] == "198.51.100.9"
    blocked = await client.get("/api/v1/banner", headers={"X-Forwarded-For": "198.51.100.9"})
    assert blocked.status == 403
    lifted = await client.delete("/api/v1/admin/ip-blocks/::ffff:198.51.100.9", headers=bearer(ADMIN))
    assert lifted.status == 200


async def test_logout_tokens_never_reach_the_logs(client: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="batlehub.access")
    secret = "someone-elses-token-0123456789"
    for headers in ({}, bearer(ALICE), bearer("not-a-token-at-all")):
        response = await client.delete(f"/registries/npm/-/user/token/{secret}", headers=headers)
        assert response.status in (401, 403)
    assert secret not in caplog.text and "/-/user/token/<redacted>" in caplog.text
    assert all(secret not in json.dumps(entry) for entry in await audit(client))


async def test_refusals_from_one_client_are_audited_once_in_a_while(client: Any) -> None:
    """2,925 audit rows in 8 s from one client with a bad token, when IP blocking is off."""
    for _ in range(50):
        assert (await client.get("/api/v1/banner", headers=bearer("bad-token-0123456789"))).status == 401
    denied = await audit(client, "denied_only=1")
    assert len(denied) == 1


@pytest.mark.parametrize(
    "query",
    ["offset=1e30", f"offset={2**63}", "registry=%00", "user=a%00b", "action=" + "x" * 600, "limit=nan"],
)
async def test_audit_log_queries_that_used_to_500(client: Any, query: str) -> None:
    response = await client.get(f"/api/v1/admin/audit-log?{query}", headers=bearer(ADMIN))
    assert response.status == 400, await response.text()


async def test_answers_say_what_they_are_and_vary_by_origin(client: Any) -> None:
    for path in ("/api/v1/banner", "/registries/npm/nothing-here", "/api/v1/admin/health"):
        response = await client.get(path)
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
    response = await client.get("/registries/npm/-/ping", headers={"Origin": "https://ui.test"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://ui.test"
    assert "Origin" in response.headers["Vary"]


async def test_user_ids_cannot_forge_log_lines(client: Any, tmp_path: Path) -> None:
    response = await client.post(
        "/api/v1/admin/tokens", headers=bearer(ADMIN), json={"user_id": "eve\nGET /x 200 0.1ms user=admin"}
    )
    assert response.status == 400
    from batlehub.errors import ConfigError

    with pytest.raises(ConfigError, match="user_id"):
        parse_settings(
            {"auth": [{"type": "token", "tokens": [{"value": "x" * 20, "role": "user", "user_id": "a b"}]}]},
            data_dir=tmp_path,
        )


async def test_a_failed_publish_leaves_no_blob_behind(client: Any) -> None:
    """A wrong attachment length used to leave the whole tarball in storage, outside any quota,
    until the sweep (an hour or more later)."""
    services = client.app[appkeys.REGISTRY_SERVICES]["npm"]
    services.artifacts.discard_grace_secs = 0.2
    tarball = b"\x1f\x8b" + b"x" * 5000
    body = {
        "_id": "lying",
        "name": "lying",
        "versions": {
            "1.0.0": {
                "name": "lying",
                "version": "1.0.0",
                "dist": {"integrity": "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()},
            }
        },
        "_attachments": {"lying-1.0.0.tgz": {"data": base64.b64encode(tarball).decode(), "length": 1}},
    }
    response = await client.put("/registries/npm/lying", json=body, headers=bearer(ALICE))
    assert response.status == 422
    storage = client.app[appkeys.STORAGE]
    for _ in range(50):
        if not [blob async for blob in storage.list("npm/blobs/")]:
            break
        await asyncio.sleep(0.1)
    assert [blob.key async for blob in storage.list("npm/blobs/")] == []
