"""Operating a shared hub (issue 5), end to end: tokens, rate limits, IP blocking, the banner, strict
quotas and the audit log, proved against two real `batlehub serve` replicas that share PostgreSQL
and a cache backend (Redis, and again with the postgres cache backend).

Everything here is state that must behave the same whichever replica a request reaches, so every
test writes on one replica and checks on the other, and spreads load over both.

One pair of replicas serves the whole module per cache backend (starting them costs seconds); tests
keep out of each other's way with their own users, package names and client addresses:

- Requests from 127.0.0.1 come from a trusted proxy (`trusted_proxies = ["127.0.0.1/32"]`), so a
  test may name any client address in `X-Forwarded-For`; 127.0.0.1 itself is never banned.
- Requests from other loopback addresses (127.0.0.2 ...; Linux routes all of 127/8 to lo) come
  from untrusted peers, whose forwarding headers must be ignored.
- Client addresses named in headers are from the documentation ranges (192.0.2/24 etc.).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import tarfile
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from batlehub_npm_testing.clients import make_package, npm_env, run_npm
from batlehub_npm_testing.clients import output as npm_output

from batlehub.coordination import BANNER_SECS
from batlehub.testing.hub import Hub, HubFactory, token_auth_toml
from batlehub.testing.services import run_coroutine_sync

ADMIN_TOKEN = "ops-admin-token-0123456789abcdef"
CONFIG_USER_TOKEN = "ops-carol-config-token-0123456789"
"""A token from the config file (user "carol"), next to the database tokens the tests create."""

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
RATE_LIMIT = 50
VERSION_QUOTA = 5
BYTE_QUOTA = 1000
"""About four of the test tarballs (each a little over 200 bytes)."""
VIOLATION_THRESHOLD = 6
BAN_SECS = 600

CONFIG = """
[server]
trusted_proxies = ["127.0.0.1/32"]

[database]
type = "postgresql"
url = "{database_url}"

{cache}

[storage]
type = "filesystem"
path = "{storage_path}"

{auth}

[[registries]]
type = "npm"
name = "npm"
mode = "local"

[[registries]]
type = "npm"
name = "limited"
mode = "local"
[registries.rate_limit]
requests_per_window = {rate_limit}
window_secs = 60

[[registries]]
type = "npm"
name = "quota"
mode = "local"
[registries.quota]
max_versions_per_user = {version_quota}
enforcement = "block"

[[registries]]
type = "npm"
name = "quotawarn"
mode = "local"
[registries.quota]
max_versions_per_user = 1
enforcement = "warn"

[[registries]]
type = "npm"
name = "quotabytes"
mode = "local"
[registries.quota]
max_bytes_per_user = {byte_quota}

[[registries]]
type = "npm"
name = "burst"
mode = "local"
[registries.rate_limit]
requests_per_window = 3
window_secs = 3

[ip_blocking]
enabled = true
violation_threshold = {violation_threshold}
violation_window_secs = 120
ban_duration_secs = {ban_secs}
trigger_on_status = [401, 403, 429]
"""


# --- the two replicas --------------------------------------------------------------------------------


@dataclass
class Cluster:
    """Two replicas sharing one database, one storage folder and one cache backend."""

    cache_type: str
    a: Hub
    b: Hub

    def replica(self, i: int) -> Hub:
        """Replica `i % 2`: how a round-robin load balancer would spread requests."""
        return (self.a, self.b)[i % 2]

    def registry_url(self, hub: Hub, registry: str = "npm") -> str:
        return f"{hub.url}/registries/{registry}/"


async def _execute(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _database_url(server_url: str, name: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(server_url)._replace(path="/" + name))


@pytest.fixture(scope="module", params=["redis", "postgres"])
def cluster(
    request: pytest.FixtureRequest, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Two hub processes per cache backend, shared by the module (a fresh database each)."""
    cache_type: str = request.param
    database = f"batlehub_ops_{uuid.uuid4().hex[:12]}"
    run_coroutine_sync(lambda: _execute(postgres_url, f'CREATE DATABASE "{database}"'))
    root = tmp_path_factory.mktemp(f"ops-{cache_type}")
    if cache_type == "redis":
        redis_url: str = request.getfixturevalue("redis_url")
        # A prefix of our own: the session's Redis is shared with other modules' tests.
        cache = f'[cache]\ntype = "redis"\nurl = "{redis_url}"\nprefix = "ops-{uuid.uuid4().hex[:8]}:"'
    else:
        cache = '[cache]\ntype = "postgres"'  # url defaults to database.url: fresh, like the database
    config = CONFIG.format(
        database_url=_database_url(postgres_url, database),
        cache=cache,
        storage_path=root / "storage",
        auth=token_auth_toml({"admin": (ADMIN_TOKEN, "admin"), "carol": (CONFIG_USER_TOKEN, "user")}),
        rate_limit=RATE_LIMIT,
        version_quota=VERSION_QUOTA,
        byte_quota=BYTE_QUOTA,
        violation_threshold=VIOLATION_THRESHOLD,
        ban_secs=BAN_SECS,
    )
    factory = HubFactory(root / "hubs")
    try:
        a, b = run_coroutine_sync(lambda: asyncio.gather(factory(config), factory(config)))
        yield Cluster(cache_type, a, b)
    finally:
        factory.stop_all()
        run_coroutine_sync(lambda: _execute(postgres_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


# --- HTTP helpers ------------------------------------------------------------------------------------


@asynccontextmanager
async def client(source_ip: str = "127.0.0.1", limit: int = 20) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session whose connections come from `source_ip` (the peer address the hub sees)."""
    connector = aiohttp.TCPConnector(local_addr=(source_ip, 0), limit=limit, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    json_body: Any = None,
    expect: int | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One request; returns status, headers and the decoded JSON body (None if not JSON)."""
    async with session.request(method, url, headers=headers, json=json_body) as response:
        raw = await response.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if expect is not None:
            assert response.status == expect, f"{method} {url}: {response.status} {raw[:500]!r}"
        return response.status, dict(response.headers), body


async def create_token(session: aiohttp.ClientSession, hub: Hub, user_id: str, role: str = "user") -> dict[str, Any]:
    _, _, body = await call(
        session,
        "POST",
        f"{hub.url}/api/v1/admin/tokens",
        headers=ADMIN,
        json_body={"user_id": user_id, "role": role, "expires_in_days": 1},
        expect=201,
    )
    return body


async def quota_of(session: aiohttp.ClientSession, hub: Hub, registry: str, user_id: str) -> dict[str, Any]:
    _, _, body = await call(
        session, "GET", f"{hub.url}/api/v1/admin/quota/{registry}/{user_id}", headers=ADMIN, expect=200
    )
    return body


async def audit_log(session: aiohttp.ClientSession, hub: Hub, **query: Any) -> dict[str, Any]:
    url = f"{hub.url}/api/v1/admin/audit-log?{urllib.parse.urlencode(query)}"
    _, _, body = await call(session, "GET", url, headers=ADMIN, expect=200)
    return body


async def whoami_status(session: aiohttp.ClientSession, hub: Hub, token: str) -> tuple[int, Any]:
    status, _, body = await call(session, "GET", f"{hub.url}/registries/npm/-/whoami", headers=bearer(token))
    return status, body


# --- npm publish bodies ------------------------------------------------------------------------------


def npm_tarball(name: str, version: str, padding: int = 0) -> bytes:
    """A gzipped package tarball as `npm pack` makes it (files under `package/`)."""
    files = {
        "package/package.json": json.dumps({"name": name, "version": version, "main": "index.js"}).encode(),
        "package/index.js": f"module.exports = {json.dumps(name + '@' + version)};\n".encode() + b"//" * padding,
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = 499162500  # npm's fixed date: tarballs do not depend on when they were made
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def publish_body(
    name: str, version: str, registry_url: str, *, tag: str = "latest", integrity: str | None = None
) -> tuple[dict[str, Any], int]:
    """The JSON body `npm publish` PUTs to `/{name}`, with the tarball as a base64 attachment.
    Returns the body and the tarball's size (what the quota counts). `integrity` overrides the
    announced digest (to provoke a mismatch)."""
    tarball = npm_tarball(name, version)
    filename = f"{name.split('/')[-1]}-{version}.tgz"
    dist = {
        "integrity": integrity or "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode(),
        "shasum": hashlib.sha1(tarball).hexdigest(),
        "tarball": f"{registry_url}{name}/-/{filename}",
    }
    if integrity:
        del dist["shasum"]  # a consistent-looking document whose bytes do not match
    manifest = {"name": name, "version": version, "description": "ops test", "main": "index.js", "dist": dist}
    body = {
        "_id": name,
        "name": name,
        "description": "ops test",
        "dist-tags": {tag: version},
        "versions": {version: manifest},
        "access": None,
        "_attachments": {
            filename: {
                "content_type": "application/octet-stream",
                "data": base64.b64encode(tarball).decode(),
                "length": len(tarball),
            }
        },
    }
    return body, len(tarball)


async def publish(
    session: aiohttp.ClientSession,
    hub: Hub,
    registry: str,
    token: str,
    name: str,
    version: str,
    **kwargs: Any,
) -> tuple[int, dict[str, str], Any, int]:
    """Publish through the npm registry API; returns status, headers, JSON body, tarball size."""
    url = f"{hub.url}/registries/{registry}/"
    body, size = publish_body(name, version, url, **kwargs)
    status, headers, answer = await call(
        session, "PUT", f"{url}{urllib.parse.quote(name, safe='@')}", headers=bearer(token), json_body=body
    )
    return status, headers, answer, size


async def packument(session: aiohttp.ClientSession, hub: Hub, registry: str, name: str) -> dict[str, Any]:
    _, _, body = await call(session, "GET", f"{hub.url}/registries/{registry}/{name}", headers=ADMIN, expect=200)
    return body


def npm_login(cwd: Path, env: dict[str, str], username: str, password: str, timeout: float = 60) -> tuple[int, str]:
    """Run the real interactive `npm login --auth-type=legacy` on a pseudo-terminal, answering
    its prompts (npm's default web login goes through the web UI: plugins/npm/tests/test_npm_web_login.py).

    Returns the exit code and everything npm printed.
    """
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: become npm
        try:
            os.chdir(cwd)
            os.execvpe("npm", ["npm", "login", "--auth-type=legacy"], env)
        finally:
            os._exit(127)
    out = b""
    answers = [(b"Username:", username), (b"Password:", password)]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # the child closed the terminal: it is done
                    break
                if not chunk:
                    break
                out += chunk
            if answers and answers[0][0] in out.rsplit(b"\n", 1)[-1]:
                os.write(fd, answers.pop(0)[1].encode() + b"\r")
                out += b"\n"
        else:
            os.kill(pid, 9)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def npmrc_of(env: dict[str, str]) -> str:
    """The `.npmrc` that npm reads (and writes, e.g. on login) with this environment."""
    return Path(env["npm_config_userconfig"]).read_text()


# --- tokens ------------------------------------------------------------------------------------------


async def test_token_made_on_one_replica_works_and_dies_on_the_other(cluster: Cluster) -> None:
    async with client() as session:
        created = await create_token(session, cluster.a, "dora")
        token = created["token"]
        assert created["user_id"] == "dora" and created["role"] == "user" and created["id"]

        assert await whoami_status(session, cluster.b, token) == (200, {"username": "dora"})
        # The config file's tokens work next to the database's, on both replicas.
        for hub in (cluster.a, cluster.b):
            assert await whoami_status(session, hub, CONFIG_USER_TOKEN) == (200, {"username": "carol"})

        status, _, _ = await call(
            session, "DELETE", f"{cluster.a.url}/api/v1/admin/tokens/{created['id']}", headers=ADMIN
        )
        assert status == 200
        # Revoked at once everywhere: the very next request on the other replica is refused.
        status, body = await whoami_status(session, cluster.b, token)
        assert status == 401 and "invalid or expired token" in body["error"]
        assert (await whoami_status(session, cluster.a, token))[0] == 401
        assert (await whoami_status(session, cluster.b, CONFIG_USER_TOKEN))[0] == 200
        # Revoking twice is a clear 404, not a silent success.
        status, _, _ = await call(
            session, "DELETE", f"{cluster.b.url}/api/v1/admin/tokens/{created['id']}", headers=ADMIN
        )
        assert status == 404


async def test_token_list_shows_no_secrets(cluster: Cluster) -> None:
    async with client() as session:
        created = await create_token(session, cluster.a, "lister")
        await whoami_status(session, cluster.a, created["token"])  # gives it a last_used, if recorded
        async with session.get(f"{cluster.b.url}/api/v1/admin/tokens", headers=ADMIN) as response:
            assert response.status == 200
            raw = await response.text()
        listed = json.loads(raw)["tokens"]
        mine = [t for t in listed if t["id"] == created["id"]]
        assert len(mine) == 1
        entry = mine[0]
        assert {"id", "user_id", "role", "created", "expires", "last_used"} <= set(entry)
        assert entry["user_id"] == "lister" and entry["role"] == "user" and epoch(entry["expires"]) > time.time()
        assert entry["last_used"] is not None and epoch(entry["created"]) <= epoch(entry["last_used"]) <= time.time()
        assert entry["created"].endswith("Z") and "T" in entry["created"]  # RFC 3339, not float epochs
        for listed_entry in listed:
            assert not {"token", "token_hash", "hash", "secret"} & set(listed_entry)
        assert created["token"] not in raw
        assert hashlib.sha256(created["token"].encode()).hexdigest() not in raw
        # Only an admin may list tokens.
        status, _, _ = await call(
            session, "GET", f"{cluster.b.url}/api/v1/admin/tokens", headers=bearer(created["token"])
        )
        assert status == 403


async def test_npm_login_with_a_token_then_npm_whoami(cluster: Cluster, tmp_path: Path) -> None:
    async with client() as session:
        token = (await create_token(session, cluster.a, "lena"))["token"]
        login = f"{cluster.b.url}/registries/npm/-/user/org.couchdb.user:lena"
        document = {"_id": "org.couchdb.user:lena", "name": "lena", "password": token, "type": "user", "roles": []}
        status, _, body = await call(session, "PUT", login, json_body=document)
        assert status == 201 and body["token"] == token
        # No passwords exist: anything but a valid token of that very user is refused.
        status, _, body = await call(session, "PUT", login, json_body={**document, "password": "hunter2"})
        assert status == 401 and "token" in body["error"]
        carol = f"{cluster.b.url}/registries/npm/-/user/org.couchdb.user:carol"
        status, _, _ = await call(session, "PUT", carol, json_body={**document, "name": "carol"})
        assert status == 401

    # The real, interactive `npm login`: user id and token; npm keeps the token in its .npmrc.
    registry = cluster.registry_url(cluster.b)
    env = npm_env(tmp_path, registry)
    code, printed = npm_login(tmp_path, env, "lena", token)
    assert code == 0 and "Logged in" in printed, printed
    assert f":_authToken={token}" in npmrc_of(env)
    result = run_npm(["whoami"], cwd=tmp_path, env=env)
    assert result.returncode == 0, npm_output(result)
    assert result.stdout.strip() == "lena"

    refused_env = npm_env(tmp_path, registry)
    code, printed = npm_login(tmp_path, refused_env, "lena", "not-a-token")
    assert code != 0 and "log in with your user id and an access token" in printed, printed
    assert "_authToken" not in npmrc_of(refused_env)


async def test_npm_logout_revokes_only_the_token_it_logs_out(cluster: Cluster, tmp_path: Path) -> None:
    async with client() as session:
        first = (await create_token(session, cluster.a, "otto"))["token"]
        second = (await create_token(session, cluster.a, "otto"))["token"]

    registry = cluster.registry_url(cluster.a)
    result = run_npm(["logout"], cwd=tmp_path, env=npm_env(tmp_path, registry, first))
    assert result.returncode == 0, npm_output(result)
    # A config token cannot be revoked from outside: logging out with it says so, rather than
    # pretending to succeed while the token keeps working.
    result = run_npm(["logout"], cwd=tmp_path, env=npm_env(tmp_path, registry, CONFIG_USER_TOKEN))
    assert result.returncode != 0 and "cannot be revoked by logging out" in npm_output(result)

    async with client() as session:
        assert (await whoami_status(session, cluster.b, first))[0] == 401
        assert await whoami_status(session, cluster.b, second) == (200, {"username": "otto"})
        assert await whoami_status(session, cluster.b, CONFIG_USER_TOKEN) == (200, {"username": "carol"})
        assert await whoami_status(session, cluster.b, ADMIN_TOKEN) == (200, {"username": "admin"})
        # Nobody can log out someone else's token by naming it in the URL.
        url = f"{cluster.b.url}/registries/npm/-/user/token/{second}"
        status, _, _ = await call(session, "DELETE", url, headers=bearer(CONFIG_USER_TOKEN))
        assert status == 403
        assert (await whoami_status(session, cluster.a, second))[0] == 200


async def test_an_expired_token_is_refused_on_both_replicas(cluster: Cluster) -> None:
    async with client() as session:
        _, _, made = await call(
            session,
            "POST",
            f"{cluster.a.url}/api/v1/admin/tokens",
            headers=ADMIN,
            json_body={"user_id": "eve", "role": "user", "expires_in_days": 2 / 86400},
            expect=201,
        )
        assert epoch(made["expires"]) - epoch(made["created"]) == pytest.approx(2, abs=0.01)
        assert (await whoami_status(session, cluster.b, made["token"]))[0] == 200
        await asyncio.sleep(max(0.0, epoch(made["expires"]) - time.time()) + 0.1)
        for hub in (cluster.a, cluster.b):
            assert (await whoami_status(session, hub, made["token"]))[0] == 401


# --- rate limits -------------------------------------------------------------------------------------


def _assert_limit_headers(headers: dict[str, str], *, remaining: int | None = None) -> None:
    assert headers["X-RateLimit-Limit"] == str(RATE_LIMIT)
    if remaining is not None:
        assert headers["X-RateLimit-Remaining"] == str(remaining)
    assert 1 <= int(headers["X-RateLimit-Reset"]) <= 60


async def test_one_rate_limit_across_both_replicas(cluster: Cluster) -> None:
    async with client(limit=40) as session:
        token = (await create_token(session, cluster.a, "rita"))["token"]

        async def ping(i: int) -> tuple[int, dict[str, str]]:
            url = f"{cluster.replica(i).url}/registries/limited/-/ping"
            status, headers, _ = await call(session, "GET", url, headers=bearer(token))
            return status, headers

        results = await asyncio.gather(*(ping(i) for i in range(120)))
    statuses = [status for status, _ in results]
    assert statuses.count(200) == RATE_LIMIT and statuses.count(429) == 120 - RATE_LIMIT, statuses
    # Both replicas answered both ways: one shared limit, not one per replica.
    assert {i % 2 for i, s in enumerate(statuses) if s == 200} == {0, 1}
    for status, headers in results:
        _assert_limit_headers(headers)
        if status == 429:
            assert headers["X-RateLimit-Remaining"] == "0"
            assert 1 <= int(headers["Retry-After"]) <= 60
    remaining = sorted(int(h["X-RateLimit-Remaining"]) for s, h in results if s == 200)
    assert remaining == list(range(RATE_LIMIT))  # every allowed request counted exactly once

    async with client() as session:
        status, headers, body = await call(
            session, "GET", f"{cluster.b.url}/registries/limited/-/ping", headers=bearer(token)
        )
        assert status == 429 and "rate limit" in body["error"] and "Retry-After" in headers
        # Another registry (no limit) and another user are not affected.
        status, _, _ = await call(session, "GET", f"{cluster.a.url}/registries/npm/-/ping", headers=bearer(token))
        assert status == 200
        status, _, _ = await call(
            session, "GET", f"{cluster.a.url}/registries/limited/-/ping", headers=bearer(CONFIG_USER_TOKEN)
        )
        assert status == 200


async def test_anonymous_requests_are_limited_per_client_ip(cluster: Cluster) -> None:
    async def burst(session: aiohttp.ClientSession, count: int, headers: dict[str, str]) -> list[int]:
        async def ping(i: int) -> int:
            url = f"{cluster.replica(i).url}/registries/limited/-/ping"
            return (await call(session, "GET", url, headers=headers))[0]

        return list(await asyncio.gather(*(ping(i) for i in range(count))))

    async with client() as proxy:  # 127.0.0.1 is a trusted proxy: its X-Forwarded-For is the client
        first = await burst(proxy, RATE_LIMIT + 3, {"X-Forwarded-For": "192.0.2.10"})
        assert first.count(200) == RATE_LIMIT and first.count(429) == 3
        # Another client behind the same proxy has its own allowance.
        assert await burst(proxy, 3, {"X-Forwarded-For": "192.0.2.11"}) == [200, 200, 200]

    # An untrusted peer cannot buy a fresh allowance by inventing X-Forwarded-For addresses.
    async with client("127.0.0.8") as direct:
        statuses = []
        for i in range(RATE_LIMIT + 2):
            url = f"{cluster.replica(i).url}/registries/limited/-/ping"
            statuses.append((await call(direct, "GET", url, headers={"X-Forwarded-For": f"198.51.100.{i}"}))[0])
        assert statuses.count(200) == RATE_LIMIT and statuses[-2:] == [429, 429]


async def test_retry_after_says_when_requests_are_allowed_again(cluster: Cluster) -> None:
    async with client() as session:
        token = (await create_token(session, cluster.a, "ryan"))["token"]
        statuses, last = [], {}
        for i in range(4):
            url = f"{cluster.replica(i).url}/registries/burst/-/ping"
            status, last, _ = await call(session, "GET", url, headers=bearer(token))
            statuses.append(status)
        assert statuses == [200, 200, 200, 429]
        wait = int(last["Retry-After"])
        assert 1 <= wait <= 3 and last["X-RateLimit-Limit"] == "3"
        await asyncio.sleep(wait + 0.2)
        status, headers, _ = await call(
            session, "GET", f"{cluster.b.url}/registries/burst/-/ping", headers=bearer(token)
        )
        assert status == 200 and headers["X-RateLimit-Remaining"] == "2"


# --- IP blocking -------------------------------------------------------------------------------------


async def block(session: aiohttp.ClientSession, hub: Hub, ip: str, **fields: Any) -> tuple[int, Any]:
    status, _, body = await call(
        session, "POST", f"{hub.url}/api/v1/admin/ip-blocks", headers=ADMIN, json_body={"ip": ip, **fields}
    )
    return status, body


async def wait_for_status(
    session: aiohttp.ClientSession, url: str, status: int, headers: dict[str, str] | None = None, within: float = 1.0
) -> tuple[int, dict[str, str], Any]:
    """Poll `url` until it answers `status` or `within` seconds pass; returns the last answer."""
    deadline = time.monotonic() + within
    while True:
        answer = await call(session, "GET", url, headers=headers)
        if answer[0] == status or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.05)


async def test_block_made_on_one_replica_holds_on_the_other(cluster: Cluster) -> None:
    async with client() as admin, client("127.0.0.5") as blocked:
        ping_b = f"{cluster.b.url}/registries/npm/-/ping"
        assert (await call(blocked, "GET", ping_b))[0] == 200
        started = time.time()
        status, created = await block(admin, cluster.a, "127.0.0.5", reason="ops test", duration_secs=300)
        assert status == 201 and created["ip"] == "127.0.0.5"

        status, headers, body = await wait_for_status(blocked, ping_b, 403, within=1.0)
        assert status == 403, "a block made on replica A was not enforced on replica B within a second"
        assert started + 299 <= int(headers["X-Block-Expires"]) <= time.time() + 301
        assert "blocked" in body["error"]
        # Every route is blocked, with or without a token; health never is.
        assert (await call(blocked, "GET", f"{cluster.a.url}/api/v1/banner"))[0] == 403
        assert (await call(blocked, "GET", f"{cluster.a.url}/api/v1/admin/tokens", headers=ADMIN))[0] == 403
        for hub in (cluster.a, cluster.b):
            assert (await call(blocked, "GET", f"{hub.url}/api/v1/admin/health"))[0] == 200
        # Listed on both replicas.
        for hub in (cluster.a, cluster.b):
            _, _, listed = await call(admin, "GET", f"{hub.url}/api/v1/admin/ip-blocks", headers=ADMIN, expect=200)
            assert "127.0.0.5" in {b["ip"] for b in listed["blocks"]}

        # Addresses are compared in their canonical form, however an operator writes them.
        status, made = await block(admin, cluster.a, "2001:DB8:0::7")
        assert status == 201 and made["ip"] == "2001:db8::7"
        url = f"{cluster.b.url}/api/v1/admin/ip-blocks/2001:DB8:0:0::7"
        assert (await call(admin, "DELETE", url, headers=ADMIN))[0] == 200

        # Lifted on B, open again on A.
        status, _, _ = await call(admin, "DELETE", f"{cluster.b.url}/api/v1/admin/ip-blocks/127.0.0.5", headers=ADMIN)
        assert status == 200
        status, _, _ = await wait_for_status(blocked, f"{cluster.a.url}/registries/npm/-/ping", 200, within=1.0)
        assert status == 200


async def test_forged_forwarded_for_from_an_untrusted_peer_changes_nothing(cluster: Cluster) -> None:
    async with client() as admin:
        assert (await block(admin, cluster.a, "127.0.0.6"))[0] == 201
        assert (await block(admin, cluster.a, "192.0.2.66"))[0] == 201

    async with client("127.0.0.6") as blocked:
        ping_b = f"{cluster.b.url}/registries/npm/-/ping"
        assert (await wait_for_status(blocked, ping_b, 403, within=1.0))[0] == 403  # reached b
        # Neither header lets a blocked peer escape its block.
        for forged in ({"X-Forwarded-For": "192.0.2.1"}, {"X-Real-IP": "192.0.2.1"}, {"X-Forwarded-For": "127.0.0.1"}):
            status, _, _ = await call(blocked, "GET", f"{cluster.b.url}/registries/npm/-/ping", headers=forged)
            assert status == 403, forged

    # The operator learns why, once per peer and process, with the setting to change.
    warnings = [line for line in cluster.b.logs().splitlines() if "ignoring X-Forwarded-For" in line]
    assert [w for w in warnings if "from 127.0.0.6:" in w and "server.trusted_proxies" in w], warnings
    assert len([w for w in warnings if "from 127.0.0.6:" in w]) == 1

    async with client("127.0.0.9") as innocent:
        # ... and naming a blocked address does not get an unblocked peer refused.
        for forged in ({"X-Forwarded-For": "192.0.2.66"}, {"X-Real-IP": "192.0.2.66"}):
            status, _, _ = await call(innocent, "GET", f"{cluster.b.url}/registries/npm/-/ping", headers=forged)
            assert status == 200, forged

    # Violations count against the peer that made them, never against an address it names.
    framed = "192.0.2.77"
    async with client("127.0.0.7") as attacker:
        for i in range(VIOLATION_THRESHOLD):
            url = f"{cluster.replica(i).url}/registries/npm/-/whoami"
            status, _, _ = await call(attacker, "GET", url, headers=bearer("bogus", **{"X-Forwarded-For": framed}))
            assert status == 401
        status, _, _ = await wait_for_status(attacker, f"{cluster.a.url}/registries/npm/-/ping", 403)
        assert status == 403
    async with client() as proxy:
        status, _, _ = await call(
            proxy, "GET", f"{cluster.b.url}/registries/npm/-/ping", headers={"X-Forwarded-For": framed}
        )
        assert status == 200
        log = await audit_log(proxy, cluster.a, denied_only=1, limit=1000)
        denied_ips = {e["client_ip"] for e in log["entries"] if e["action"] == "request.denied"}
        assert "127.0.0.7" in denied_ips and framed not in denied_ips


async def test_forwarded_for_from_a_trusted_proxy_is_believed(cluster: Cluster) -> None:
    async with client() as proxy:
        assert (await block(proxy, cluster.a, "203.0.113.40"))[0] == 201
        ping = f"{cluster.b.url}/registries/npm/-/ping"
        blocked = {"X-Forwarded-For": "203.0.113.40"}
        assert (await wait_for_status(proxy, ping, 403, headers=blocked, within=1.0))[0] == 403  # reached b
        for chain in ("203.0.113.40", "203.0.113.40, 127.0.0.1", "198.51.100.1, 203.0.113.40"):
            status, headers, _ = await call(proxy, "GET", ping, headers={"X-Forwarded-For": chain})
            assert status == 403 and "X-Block-Expires" in headers, chain
        status, _, _ = await call(proxy, "GET", ping, headers={"X-Real-IP": "203.0.113.40"})
        assert status == 403
        # Walked from the right: a client cannot hide behind an address it prepends itself.
        status, _, _ = await call(proxy, "GET", ping, headers={"X-Forwarded-For": "203.0.113.40, 203.0.113.41"})
        assert status == 200
        # The proxy itself is neither blocked nor blockable.
        assert (await call(proxy, "GET", ping))[0] == 200
        status, body = await block(proxy, cluster.b, "127.0.0.1")
        assert status == 400 and "trusted_proxies" in body["error"]


async def test_violations_on_both_replicas_add_up_to_a_ban(cluster: Cluster) -> None:
    offender = {"X-Forwarded-For": "203.0.113.50"}
    async with client() as proxy:
        for i in range(VIOLATION_THRESHOLD - 1):
            url = f"{cluster.replica(i).url}/registries/npm/-/whoami"
            assert (await call(proxy, "GET", url, headers=bearer("wrong-token", **offender)))[0] == 401
        # Not banned yet: one replica's count alone is below the threshold, and so is the sum.
        assert (await call(proxy, "GET", f"{cluster.a.url}/registries/npm/-/ping", headers=offender))[0] == 200
        url = f"{cluster.b.url}/registries/npm/-/whoami"
        assert (await call(proxy, "GET", url, headers=bearer("wrong-token", **offender)))[0] == 401
        started = time.time()
        status, headers, _ = await wait_for_status(
            proxy, f"{cluster.a.url}/registries/npm/-/ping", 403, headers=offender
        )
        assert status == 403
        assert started + BAN_SECS - 5 <= int(headers["X-Block-Expires"]) <= time.time() + BAN_SECS + 1
        _, _, listed = await call(proxy, "GET", f"{cluster.b.url}/api/v1/admin/ip-blocks", headers=ADMIN, expect=200)
        entry = next(b for b in listed["blocks"] if b["ip"] == "203.0.113.50")
        assert "violations" in entry["reason"]
        # The ban is an IP-block change like any other: the audit log says when and why.
        log = await audit_log(proxy, cluster.a, action="ip_block.add", since=started - 5)
        auto = [e for e in log["entries"] if e["target"] == "203.0.113.50"]
        assert auto and auto[0]["user_id"] is None and "violations" in json.loads(auto[0]["detail"])["reason"]
        # Others behind the same proxy are unaffected.
        other = {"X-Forwarded-For": "203.0.113.51"}
        assert (await call(proxy, "GET", f"{cluster.b.url}/registries/npm/-/ping", headers=other))[0] == 200


async def test_a_trusted_proxy_is_never_banned(cluster: Cluster) -> None:
    async with client() as proxy:
        for i in range(VIOLATION_THRESHOLD * 2):
            url = f"{cluster.replica(i).url}/registries/npm/-/whoami"
            assert (await call(proxy, "GET", url, headers=bearer("wrong-token")))[0] == 401
        await asyncio.sleep(0.2)
        for hub in (cluster.a, cluster.b):
            assert (await call(proxy, "GET", f"{hub.url}/registries/npm/-/ping"))[0] == 200
        _, _, listed = await call(proxy, "GET", f"{cluster.a.url}/api/v1/admin/ip-blocks", headers=ADMIN, expect=200)
        assert "127.0.0.1" not in {b["ip"] for b in listed["blocks"]}


async def test_hammering_a_block_neither_shortens_nor_rewrites_it(cluster: Cluster) -> None:
    """Requests refused by a block (403) are not new violations: counting them would replace a long
    administrator's block by an automatic one of `ban_duration_secs`, and lose its reason."""
    hammerer = {"X-Forwarded-For": "203.0.113.60"}
    async with client() as proxy:
        status, made = await block(
            proxy, cluster.a, "203.0.113.60", reason="abuse ticket 42", duration_secs=BAN_SECS * 10
        )
        assert status == 201
        # Blocks reach every replica within a second (each reloads the list twice a second).
        ping_b = f"{cluster.b.url}/registries/npm/-/ping"
        assert (await wait_for_status(proxy, ping_b, 403, headers=hammerer, within=1.0))[0] == 403
        for i in range(VIOLATION_THRESHOLD * 2):
            url = f"{cluster.replica(i).url}/registries/npm/-/ping"
            status, headers, _ = await call(proxy, "GET", url, headers=hammerer)
            assert status == 403 and int(headers["X-Block-Expires"]) == int(made["expires_at"])
        _, _, listed = await call(proxy, "GET", f"{cluster.b.url}/api/v1/admin/ip-blocks", headers=ADMIN, expect=200)
        entry = next(b for b in listed["blocks"] if b["ip"] == "203.0.113.60")
        assert entry["reason"] == "abuse ticket 42" and entry["expires_at"] == pytest.approx(made["expires_at"])


# --- banner ------------------------------------------------------------------------------------------


async def test_banner_set_on_one_replica_shows_on_the_other_and_in_npm_install(
    cluster: Cluster, tmp_path: Path
) -> None:
    message = f"ops-banner {cluster.cache_type}: registry maintenance at 18:00 UTC"
    async with client() as session:
        status, _, _, _ = await publish(session, cluster.a, "npm", CONFIG_USER_TOKEN, "ops-banner-pkg", "1.0.0")
        assert status == 201
        await call(
            session,
            "PUT",
            f"{cluster.a.url}/api/v1/admin/banner",
            headers=ADMIN,
            json_body={"message": message, "level": "warning"},
            expect=200,
        )
        _, _, shown = await call(session, "GET", f"{cluster.b.url}/api/v1/banner", expect=200)
        assert shown == {"message": message, "level": "warning"}

    def fresh_project(label: str) -> Path:
        project = tmp_path / label
        project.mkdir()
        (project / "package.json").write_text(json.dumps({"name": f"banner-{label}", "version": "1.0.0"}))
        return project

    def install(hub: Hub, project: Path) -> str:
        # A fresh cache, so every request reaches `hub`; audit on, as npm has it by default. npm
        # prints an `npm-notice` only from responses it does not keep in its cache (it skips any
        # response marked `x-local-cache`): of an install's requests, the audit POST shows it.
        env = {**npm_env(tmp_path, cluster.registry_url(hub)), "npm_config_audit": "true"}
        result = run_npm(["install", "ops-banner-pkg"], cwd=project, env=env)
        assert result.returncode == 0, npm_output(result)
        assert (project / "node_modules" / "ops-banner-pkg" / "index.js").is_file()
        return npm_output(result)

    try:
        assert f"npm notice {message}" in install(cluster.b, fresh_project("with-banner"))
        async with client() as session:  # every npm response carries it, errors included
            for path in ("ops-banner-pkg", "ops-banner-pkg/-/ops-banner-pkg-1.0.0.tgz", "no-such-package"):
                _, headers, _ = await call(session, "GET", f"{cluster.b.url}/registries/npm/{path}")
                assert headers.get("npm-notice") == message, path
    finally:
        async with client() as session:
            await call(session, "DELETE", f"{cluster.b.url}/api/v1/admin/banner", headers=ADMIN, expect=200)

    async with client() as session:
        _, _, shown = await call(session, "GET", f"{cluster.a.url}/api/v1/banner", expect=200)
        assert shown == {"message": None}
        await asyncio.sleep(BANNER_SECS)  # how long a replica may show the banner it last read
        status, headers, _ = await call(session, "GET", f"{cluster.a.url}/registries/npm/ops-banner-pkg")
        assert status == 200 and "npm-notice" not in {k.lower() for k in headers}
    assert "npm notice" not in install(cluster.a, fresh_project("after-banner"))


# --- quotas ------------------------------------------------------------------------------------------


async def test_concurrent_publishes_on_both_replicas_never_pass_the_version_quota(cluster: Cluster) -> None:
    async with client(limit=40) as session:
        token = (await create_token(session, cluster.a, "quentin"))["token"]
        results = await asyncio.gather(
            *(publish(session, cluster.replica(i), "quota", token, "ops-quota-race", f"1.0.{i}") for i in range(20))
        )
        accepted = [(i, size) for i, (status, _, _, size) in enumerate(results) if status == 201]
        refused = [(status, body) for status, _, body, _ in results if status != 201]
        assert len(accepted) == VERSION_QUOTA, [r[:3] for r in results]
        assert len(refused) == 20 - VERSION_QUOTA
        for status, body in refused:
            assert 400 <= status < 500 and "quota exceeded" in body["error"], (status, body)

        for hub in (cluster.a, cluster.b):
            document = await packument(session, hub, "quota", "ops-quota-race")
            assert sorted(document["versions"]) == sorted(f"1.0.{i}" for i, _ in accepted)
            usage = await quota_of(session, hub, "quota", "quentin")
            assert usage["used_versions"] == VERSION_QUOTA and usage["max_versions"] == VERSION_QUOTA
            assert usage["used_bytes"] == sum(size for _, size in accepted)
            assert usage["enforcement"] == "block"


async def test_over_quota_refusals_do_not_get_an_address_banned(cluster: Cluster) -> None:
    # Many users may publish from one CI address; running out of quota is not abuse, so these 403s
    # must not count towards ip_blocking even though 403 is in trigger_on_status.
    async with client() as admin, client("127.0.0.4") as ci:
        token = (await create_token(admin, cluster.a, "olga"))["token"]
        statuses = []
        for i in range(VERSION_QUOTA + VIOLATION_THRESHOLD + 2):
            status, _, _, _ = await publish(ci, cluster.replica(i), "quota", token, "ops-quota-noban", f"2.0.{i}")
            statuses.append(status)
        assert statuses.count(201) == VERSION_QUOTA and statuses.count(403) >= VIOLATION_THRESHOLD + 2, statuses
        _, _, listed = await call(admin, "GET", f"{cluster.b.url}/api/v1/admin/ip-blocks", headers=ADMIN, expect=200)
        assert "127.0.0.4" not in {b["ip"] for b in listed["blocks"]}
        status, _, _ = await call(ci, "GET", f"{cluster.b.url}/registries/quota/ops-quota-noban")
        assert status == 200


async def test_concurrent_publishes_never_pass_the_byte_quota(cluster: Cluster) -> None:
    async with client(limit=40) as session:
        token = (await create_token(session, cluster.a, "bea"))["token"]
        results = await asyncio.gather(
            *(
                publish(session, cluster.replica(i), "quotabytes", token, "ops-quota-bytes", f"1.0.{i}")
                for i in range(12)
            )
        )
        accepted = [size for status, _, _, size in results if status == 201]
        refused = [size for status, _, _, size in results if status != 201]
        assert accepted and refused, [r[:3] for r in results]
        assert all(
            400 <= status < 500 and "quota exceeded" in body["error"] for status, _, body, _ in results if status != 201
        )
        usage = await quota_of(session, cluster.b, "quotabytes", "bea")
        assert usage["used_bytes"] == sum(accepted) <= BYTE_QUOTA
        assert usage["used_bytes"] + min(refused) > BYTE_QUOTA  # nothing was refused that still fitted
        assert usage["used_versions"] == len(accepted) and usage["max_bytes"] == BYTE_QUOTA
        document = await packument(session, cluster.a, "quotabytes", "ops-quota-bytes")
        assert len(document["versions"]) == len(accepted)


async def test_npm_prints_the_quota_error(cluster: Cluster, tmp_path: Path) -> None:
    async with client() as session:
        token = (await create_token(session, cluster.a, "nina"))["token"]
        for i in range(VERSION_QUOTA):
            status, _, body, _ = await publish(session, cluster.replica(i), "quota", token, "ops-quota-cli", f"0.{i}.0")
            assert status == 201, body
    package = make_package(tmp_path, "ops-quota-cli", "9.0.0")
    result = run_npm(["publish"], cwd=package, env=npm_env(tmp_path, cluster.registry_url(cluster.b, "quota"), token))
    assert result.returncode != 0
    assert "quota exceeded for user 'nina'" in npm_output(result)
    async with client() as session:
        assert (await quota_of(session, cluster.a, "quota", "nina"))["used_versions"] == VERSION_QUOTA
        assert "9.0.0" not in (await packument(session, cluster.a, "quota", "ops-quota-cli"))["versions"]


async def test_a_failed_publish_leaves_the_counter_exactly_as_it_was(cluster: Cluster) -> None:
    async with client() as session:
        token = (await create_token(session, cluster.a, "fay"))["token"]
        status, _, _, size = await publish(session, cluster.a, "quota", token, "ops-quota-fail", "1.0.0")
        assert status == 201
        before = await quota_of(session, cluster.b, "quota", "fay")
        assert (before["used_versions"], before["used_bytes"]) == (1, size)

        wrong = "sha512-" + base64.b64encode(hashlib.sha512(b"other bytes").digest()).decode()
        status, _, body, _ = await publish(
            session, cluster.b, "quota", token, "ops-quota-fail", "1.0.1", integrity=wrong
        )
        assert 400 <= status < 500 and body["error"], (status, body)
        # Publishing over an existing version fails too.
        status, _, body, _ = await publish(session, cluster.b, "quota", token, "ops-quota-fail", "1.0.0")
        assert status == 409, (status, body)
        # A race for one version: one wins; the losers' counts are rolled back with their transactions.
        race = await asyncio.gather(
            *(publish(session, cluster.replica(i), "quota", token, "ops-quota-fail", "2.0.0") for i in range(8))
        )
        assert sorted(r[0] for r in race) == [201] + [409] * 7, [r[:3] for r in race]

        after = await quota_of(session, cluster.a, "quota", "fay")
        assert (after["used_versions"], after["used_bytes"]) == (2, size + race[0][3])
        assert sorted((await packument(session, cluster.a, "quota", "ops-quota-fail"))["versions"]) == [
            "1.0.0",
            "2.0.0",
        ]


async def test_warn_enforcement_publishes_with_a_warning_header(cluster: Cluster, tmp_path: Path) -> None:
    async with client() as session:
        token = (await create_token(session, cluster.a, "walt"))["token"]
        status, headers, _, _ = await publish(session, cluster.a, "quotawarn", token, "ops-quota-warn", "1.0.0")
        assert status == 201 and "X-Quota-Warning" not in headers
        status, headers, _, _ = await publish(session, cluster.b, "quotawarn", token, "ops-quota-warn", "1.0.1")
        assert status == 201
        assert "quota exceeded" in headers["X-Quota-Warning"]
        document = await packument(session, cluster.a, "quotawarn", "ops-quota-warn")
        assert sorted(document["versions"]) == ["1.0.0", "1.0.1"]
        usage = await quota_of(session, cluster.a, "quotawarn", "walt")
        assert usage["used_versions"] == 2 and usage["enforcement"] == "warn"

    # npm shows the warning to whoever publishes.
    package = make_package(tmp_path, "ops-quota-warn", "1.0.2")
    result = run_npm(
        ["publish"], cwd=package, env=npm_env(tmp_path, cluster.registry_url(cluster.b, "quotawarn"), token)
    )
    assert result.returncode == 0, npm_output(result)
    assert "npm notice quota exceeded for user 'walt'" in npm_output(result)


async def test_the_quota_warning_reaches_npm_while_a_banner_is_set(cluster: Cluster) -> None:
    async with client() as session:
        token = (await create_token(session, cluster.a, "wanda"))["token"]
        assert (await publish(session, cluster.a, "quotawarn", token, "ops-quota-warn-banner", "1.0.0"))[0] == 201
        banner = f"{cluster.a.url}/api/v1/admin/banner"
        await call(session, "PUT", banner, headers=ADMIN, json_body={"message": "ops warn-banner"}, expect=200)
        try:
            status, headers, _, _ = await publish(
                session, cluster.b, "quotawarn", token, "ops-quota-warn-banner", "1.0.1"
            )
        finally:
            await call(session, "DELETE", banner, headers=ADMIN, expect=200)
        assert status == 201 and "quota exceeded" in headers["X-Quota-Warning"]
        assert "quota exceeded" in headers.get("npm-notice", "")


async def test_unpublish_gives_the_quota_back(cluster: Cluster, tmp_path: Path) -> None:
    name = "ops-quota-unpublish"
    async with client() as session:
        token = (await create_token(session, cluster.a, "ursula"))["token"]
        sizes = {}
        for i in range(VERSION_QUOTA):
            status, _, _, sizes[f"1.0.{i}"] = await publish(
                session, cluster.replica(i), "quota", token, name, f"1.0.{i}"
            )
            assert status == 201
        assert (await publish(session, cluster.a, "quota", token, name, "1.1.0"))[0] == 403

        # Unpublish one version the way npm does its last step (tarball DELETE with the revision).
        document = await packument(session, cluster.b, "quota", name)
        url = f"{cluster.b.url}/registries/quota/{name}/-/{name}-1.0.0.tgz/-rev/{document['_rev']}"
        status, _, body = await call(session, "DELETE", url, headers=ADMIN)
        assert status == 200, body
        usage = await quota_of(session, cluster.a, "quota", "ursula")
        assert usage["used_versions"] == VERSION_QUOTA - 1
        assert usage["used_bytes"] == sum(sizes.values()) - sizes["1.0.0"]
        # The freed slot is usable at once, on either replica.
        assert (await publish(session, cluster.a, "quota", token, name, "1.1.0"))[0] == 201

        document = await packument(session, cluster.a, "quota", name)
        url = f"{cluster.a.url}/registries/quota/{name}/-rev/{document['_rev']}"
        status, _, body = await call(session, "DELETE", url, headers=ADMIN)
        assert status == 200, body
        usage = await quota_of(session, cluster.b, "quota", "ursula")
        assert (usage["used_versions"], usage["used_bytes"]) == (0, 0)

        for version in ("2.0.0", "2.0.1"):
            assert (await publish(session, cluster.b, "quota", token, name, version))[0] == 201

    # The real `npm unpublish name@version` (a document PUT, then a tarball DELETE) gives back one
    # version, not two.
    result = run_npm(
        ["unpublish", f"{name}@2.0.0", "--force"],
        cwd=tmp_path,
        env=npm_env(tmp_path, cluster.registry_url(cluster.a, "quota"), ADMIN_TOKEN),
    )
    assert result.returncode == 0, npm_output(result)
    async with client() as session:
        usage = await quota_of(session, cluster.b, "quota", "ursula")
        assert usage["used_versions"] == 1
        assert sorted((await packument(session, cluster.b, "quota", name))["versions"]) == ["2.0.1"]


# --- audit log ---------------------------------------------------------------------------------------


async def test_audit_log_records_who_what_when_where_and_filters(cluster: Cluster) -> None:
    name = "ops-audited"
    started = time.time() - 0.001
    where = {"X-Forwarded-For": "192.0.2.200"}
    async with client() as session:
        made = await create_token(session, cluster.a, "aude")
        token = made["token"]
        headers = bearer(token, **where)
        registry_b = f"{cluster.b.url}/registries/npm"

        body, _ = publish_body(name, "1.0.0", registry_b + "/")
        await call(session, "PUT", f"{registry_b}/{name}", headers=headers, json_body=body, expect=201)
        body, _ = publish_body(name, "1.1.0", registry_b + "/", tag="beta")
        await call(
            session, "PUT", f"{cluster.a.url}/registries/npm/{name}", headers=headers, json_body=body, expect=201
        )
        await call(
            session,
            "PUT",
            f"{registry_b}/-/package/{name}/dist-tags/next",
            headers=headers,
            json_body="1.1.0",
            expect=201,
        )
        deprecate = {"_id": name, "name": name, "versions": {"1.0.0": {"deprecated": "use 1.1.0"}}}
        await call(session, "PUT", f"{registry_b}/{name}", headers=headers, json_body=deprecate, expect=200)
        document = await packument(session, cluster.a, "npm", name)
        assert document["versions"]["1.0.0"]["deprecated"] == "use 1.1.0"
        # A user may publish but not unpublish (releases:delete): denied, and recorded as such.
        status, _, _ = await call(session, "DELETE", f"{registry_b}/{name}/-rev/{document['_rev']}", headers=headers)
        assert status == 403
        admin_where = {**ADMIN, **where}
        await call(session, "DELETE", f"{registry_b}/{name}/-rev/{document['_rev']}", headers=admin_where, expect=200)
        await call(
            session,
            "PUT",
            f"{cluster.a.url}/api/v1/admin/banner",
            headers=admin_where,
            json_body={"message": "audited"},
            expect=200,
        )
        await call(session, "DELETE", f"{cluster.b.url}/api/v1/admin/banner", headers=admin_where, expect=200)
        await call(
            session,
            "POST",
            f"{cluster.a.url}/api/v1/admin/ip-blocks",
            headers=admin_where,
            json_body={"ip": "198.51.100.99"},
            expect=201,
        )
        await call(
            session, "DELETE", f"{cluster.b.url}/api/v1/admin/ip-blocks/198.51.100.99", headers=admin_where, expect=200
        )
        await call(
            session, "DELETE", f"{cluster.a.url}/api/v1/admin/tokens/{made['id']}", headers=admin_where, expect=200
        )
        await call(session, "GET", f"{registry_b}/-/whoami", headers=bearer(token, **where), expect=401)
        await call(
            session,
            "GET",
            f"{cluster.a.url}/api/v1/admin/audit-log",
            headers=bearer(CONFIG_USER_TOKEN, **where),
            expect=403,
        )
        finished = time.time() + 0.001

        # Who, what, when, from where, with which result — the same on either replica.
        by_aude = await audit_log(session, cluster.b, user="aude", since=started, until=finished)
        assert by_aude == await audit_log(session, cluster.a, user="aude", since=started, until=finished)
        actions = [(e["action"], e["target"], e["result"]) for e in reversed(by_aude["entries"])]
        assert actions[:4] == [
            ("npm.publish", f"{name}@1.0.0", "ok"),
            ("npm.publish", f"{name}@1.1.0", "ok"),
            ("npm.dist-tag.add", f"{name}@1.1.0", "ok"),
            ("npm.update", name, "ok"),
        ]
        assert actions[4][0] == "request.denied" and actions[4][2] == "denied" and name in actions[4][1]
        assert len(actions) == 5
        deprecation = json.loads(by_aude["entries"][1]["detail"])
        assert deprecation["deprecation_changed"] == ["1.0.0"]
        for entry in by_aude["entries"]:
            assert entry["client_ip"] == "192.0.2.200" and entry["user_id"] == "aude"
            assert started <= entry["ts"] <= finished
            assert entry["registry"] == "npm"

        by_admin = await audit_log(session, cluster.a, user="admin", since=started, until=finished)
        admin_actions = [(e["action"], e["target"]) for e in reversed(by_admin["entries"])]
        assert admin_actions == [
            ("token.create", made["id"]),
            ("npm.unpublish", name),
            ("banner.set", "audited"),
            ("banner.clear", None),
            ("ip_block.add", "198.51.100.99"),
            ("ip_block.remove", "198.51.100.99"),
            ("token.revoke", made["id"]),
        ]
        # The token was made without a forwarding header: the trusted proxy's own address.
        assert [e["client_ip"] for e in reversed(by_admin["entries"])] == ["127.0.0.1"] + ["192.0.2.200"] * 6
        assert json.loads(by_admin["entries"][-1]["detail"]) == {"user_id": "aude", "role": "user"}

        # Denied requests, anonymous or not, with the status that refused them.
        denied = await audit_log(session, cluster.b, denied_only="true", since=started, until=finished)
        denied_entries = [e for e in denied["entries"] if e["client_ip"] == "192.0.2.200"]
        assert {(e["user_id"], json.loads(e["detail"])["status"]) for e in denied_entries} == {
            ("aude", 403),
            (None, 401),  # the revoked token: nobody, as far as the hub can tell
            ("carol", 403),
        }
        assert all(e["result"] == "denied" for e in denied["entries"])

        # Filters: registry, time range.
        in_registry = await audit_log(session, cluster.a, registry="npm", since=started, until=finished, limit=1000)
        assert {e["registry"] for e in in_registry["entries"]} == {"npm"}
        assert {"npm.publish", "npm.unpublish", "npm.dist-tag.add"} <= {e["action"] for e in in_registry["entries"]}
        assert (await audit_log(session, cluster.a, user="aude", until=started))["total"] == 0
        # Times as an operator types them work as well as epoch seconds.
        iso = {k: datetime.fromtimestamp(v, UTC).isoformat() for k, v in (("since", started), ("until", finished))}
        assert (await audit_log(session, cluster.b, user="aude", **iso))["entries"] == by_aude["entries"]
        naive = datetime.fromtimestamp(finished, UTC).replace(tzinfo=None).isoformat()  # no zone: UTC
        assert (await audit_log(session, cluster.b, user="aude", since=naive))["total"] == 0
        status, _, body = await call(
            session, "GET", f"{cluster.a.url}/api/v1/admin/audit-log?since=yesterday", headers=ADMIN
        )
        assert status == 400 and "since" in body["error"]
        assert (await audit_log(session, cluster.a, user="aude", since=finished))["total"] == 0

        # Paging: newest first, pages of two that add up to the whole list without overlap.
        whole = by_aude["entries"] + by_admin["entries"]
        pages = []
        for offset in range(0, by_aude["total"], 2):
            page = await audit_log(session, cluster.b, user="aude", since=started, limit=2, offset=offset)
            assert page["total"] == by_aude["total"] and page["limit"] == 2 and page["offset"] == offset
            pages += page["entries"]
        assert [e["id"] for e in pages] == [e["id"] for e in by_aude["entries"]]
        assert len(whole) == len({e["id"] for e in whole})
        status, _, body = await call(session, "GET", f"{cluster.a.url}/api/v1/admin/audit-log?limit=0", headers=ADMIN)
        assert status == 400 and "limit" in body["error"]


def epoch(rfc3339: str) -> float:
    """The admin API's times are RFC 3339 strings."""
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
