"""The server in-process, as an operator and a client see it: health, the admin API, the request
pipeline (client IP, IP blocks, auth, rate limits), CORS, the static UI, and a storage backend
added by a plugin defined right here."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pluggy
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from batlehub import admin, appkeys
from batlehub.app import create_app
from batlehub.builtin.cache_memory import MemoryCache
from batlehub.config import RegistrySettings, parse_settings
from batlehub.configmodel import ConfigModel
from batlehub.errors import ConfigError, NotFound
from batlehub.interfaces import (
    BlobStat,
    CacheBackendType,
    RegistryFormatType,
    StorageBackendType,
    StoredBlob,
)
from batlehub.plugins import get_plugin_manager, hookimpl
from batlehub.registries import RegistryServices
from batlehub.requests import require

ADMIN_TOKEN = "admin-secret-token"
USER_TOKEN = "user-secret-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
USER = {"Authorization": f"Bearer {USER_TOKEN}"}
HEALTH = "/api/v1/admin/health"

ClientFactory = Callable[..., Any]


# --- test plugins -----------------------------------------------------------------------------------


class PingOptions(ConfigModel):
    greeting: str = "pong"


class PingRegistry:
    """The smallest registry format: GET /ping (releases:read), PUT /publish (releases:publish)."""

    def __init__(self, settings: RegistrySettings, services: RegistryServices) -> None:
        self.name = settings.name
        self.settings = settings
        self.options = settings.validated_options(PingOptions)

    def make_app(self) -> web.Application:
        async def ping(request: web.Request) -> web.Response:
            identity = require(request, "releases:read")
            return web.json_response({"pong": True, "user": identity.user_id})

        async def publish(request: web.Request) -> web.Response:
            identity = require(request, "releases:publish")
            return web.json_response({"published": True, "user": identity.user_id}, status=201)

        app = web.Application()
        app.router.add_get("/ping", ping)
        app.router.add_put("/publish", publish)
        return app

    async def startup(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass


class PingFormatPlugin:
    @hookimpl
    def register_registry_formats(self) -> list[RegistryFormatType]:
        return [
            RegistryFormatType(name="ping", description="test format", config_model=PingOptions, factory=PingRegistry)
        ]


class TinyStorage:
    """A storage backend in a dict, whose health can be switched off."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.blobs: dict[str, bytes] = {}
        self.pings = 0
        self.failing = False
        self.opened = self.closed = False

    async def open(self) -> None:
        self.opened = True

    async def close(self) -> None:
        self.closed = True

    async def ping(self) -> None:
        self.pings += 1
        if self.failing:
            raise OSError("tiny disk on fire")

    async def put(self, key: str, chunks: Any, *, max_size: int | None = None, expected: Any = None) -> StoredBlob:
        data = b"".join([c async for c in chunks])
        self.blobs[key] = data
        import hashlib

        return StoredBlob(
            key,
            len(data),
            hashlib.sha512(data).hexdigest(),
            hashlib.sha256(data).hexdigest(),
            hashlib.sha1(data).hexdigest(),
        )

    async def get(self, key: str, start: int | None = None, end: int | None = None) -> AsyncIterator[bytes]:
        if key not in self.blobs:
            raise NotFound(key)
        yield self.blobs[key][start:end]

    async def stat(self, key: str) -> BlobStat | None:
        return BlobStat(key, len(self.blobs[key]), 0.0) if key in self.blobs else None

    async def delete(self, key: str) -> bool:
        return self.blobs.pop(key, None) is not None

    async def list(self, prefix: str = "") -> AsyncIterator[BlobStat]:
        for key, data in self.blobs.items():
            if key.startswith(prefix):
                yield BlobStat(key, len(data), 0.0)

    def local_path(self, key: str) -> Path | None:
        return None

    async def presigned_url(self, key: str, expires_secs: int = 300) -> str | None:
        return None


class TinyStorageConfig(ConfigModel):
    label: str = ""


class TinyStoragePlugin:
    @hookimpl
    def register_storage_backends(self) -> list[StorageBackendType]:
        return [
            StorageBackendType(
                name="tiny",
                description="test storage in a dict",
                factory=lambda config, settings: TinyStorage(config.label),
                config_model=TinyStorageConfig,
            )
        ]


@pytest.fixture
def pm() -> Any:
    manager = get_plugin_manager(load_entrypoints=False)
    manager.register(PingFormatPlugin(), name="test-ping-format")
    manager.register(TinyStoragePlugin(), name="test-tiny-storage")
    yield manager
    manager.unregister(name="test-ping-format")
    manager.unregister(name="test-tiny-storage")


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Path, pm: pluggy.PluginManager) -> ClientFactory:
    """Build settings (config tokens for an admin and a user, no registries unless given), the
    app, and a test client for it."""

    async def make(**raw: Any) -> TestClient:
        raw.setdefault("registries", [])
        raw.setdefault(
            "auth",
            [
                {
                    "type": "token",
                    "tokens": [
                        {"value": ADMIN_TOKEN, "role": "admin", "user_id": "root"},
                        {"value": USER_TOKEN, "role": "user", "user_id": "alice"},
                    ],
                }
            ],
        )
        raw.setdefault("storage", {"type": "filesystem", "path": str(tmp_path / "blobs")})
        settings = parse_settings(raw, data_dir=tmp_path / "data")
        return await aiohttp_client(create_app(settings, pm))

    return make


@pytest.fixture
def database_raw(request: pytest.FixtureRequest) -> dict[str, Any]:
    """`[database]` for tests parametrized (indirectly) over "sqlite" and "postgresql"."""
    if getattr(request, "param", "sqlite") == "postgresql":
        return {"type": "postgresql", "url": request.getfixturevalue("fresh_postgres_url")}
    return {}


BOTH_DATABASES = pytest.mark.parametrize("database_raw", ["sqlite", "postgresql"], indirect=True)


def ping_registry(name: str = "reg", **extra: Any) -> dict[str, Any]:
    return {"type": "ping", "name": name, **extra}


# --- health ---------------------------------------------------------------------------------------


async def test_health_reports_every_check(make_client: ClientFactory) -> None:
    client = await make_client()
    response = await client.get(HEALTH)
    assert response.status == 200
    assert await response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "storage": "ok", "cache": "ok"},
    }


async def test_health_is_503_while_shutting_down(make_client: ClientFactory) -> None:
    client = await make_client()
    client.app[appkeys.STATE].shutting_down = True
    response = await client.get(HEALTH)
    assert response.status == 503
    assert (await response.json())["status"] == "shutting_down"


async def test_storage_failing_is_503_naming_the_check(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(storage={"type": "tiny"})
    storage = client.app[appkeys.STORAGE]
    assert isinstance(storage, TinyStorage)
    storage.failing = True
    response = await client.get(HEALTH)
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["storage"].startswith("error: OSError")
    # Anyone may ask for health: the details (paths, hosts) are for the operator's log only.
    assert "tiny disk on fire" not in body["checks"]["storage"]
    assert "tiny disk on fire" in caplog.text
    assert body["checks"]["database"] == "ok"


async def test_database_failing_is_503_naming_the_check(make_client: ClientFactory) -> None:
    client = await make_client()
    await client.app[appkeys.DATABASE].close()
    response = await client.get(HEALTH)
    assert response.status == 503
    body = await response.json()
    assert body["checks"]["database"].startswith("error:")
    assert body["checks"]["storage"] == "ok"


async def test_storage_backend_from_a_plugin_is_selected_by_config(make_client: ClientFactory) -> None:
    client = await make_client(storage={"type": "tiny", "label": "from-config"})
    storage = client.app[appkeys.STORAGE]
    assert isinstance(storage, TinyStorage)
    assert storage.label == "from-config"
    assert storage.opened
    response = await client.get(HEALTH)
    assert response.status == 200
    assert storage.pings == 1
    await client.close()
    assert storage.closed


async def test_plugin_storage_keys_are_checked(make_client: ClientFactory) -> None:
    with pytest.raises(ConfigError) as info:
        await make_client(storage={"type": "tiny", "path": "/x"})
    assert info.value.problems == ["storage.path: unknown key for type 'tiny' (known: label, type)"]


async def test_plugin_storage_values_are_checked_by_its_model(make_client: ClientFactory) -> None:
    with pytest.raises(ConfigError) as info:
        await make_client(storage={"type": "tiny", "label": 7})
    assert info.value.problems == ["storage.label: expected a string, got 7"]


async def test_unknown_registry_option_is_a_config_error(make_client: ClientFactory) -> None:
    with pytest.raises(ConfigError) as info:
        await make_client(registries=[ping_registry(colour="red")])
    assert info.value.problems == [
        "registries[0].colour: unknown key for type 'ping'"
        " (known: greeting, name, policy, quota, rate_limit, rbac, retention, type)"
    ]


async def test_registry_gets_its_validated_options_everywhere(make_client: ClientFactory) -> None:
    """The factory, the app's settings and the registry's services hold one validated entry."""
    client = await make_client(registries=[ping_registry(greeting="hello")])
    registry = client.app[appkeys.REGISTRIES]["reg"]
    assert isinstance(registry, PingRegistry)
    assert registry.options == PingOptions(greeting="hello")
    assert client.app[appkeys.SETTINGS].registry("reg") is registry.settings
    assert client.app[appkeys.REGISTRY_SERVICES]["reg"].registry is registry.settings


class FlakyCache(MemoryCache):
    """The memory cache, with a ping that can be made to fail or hang."""

    mode = "ok"

    async def ping(self) -> None:
        if self.mode == "fail":
            raise ConnectionError("cache went away")
        if self.mode == "hang":
            await asyncio.sleep(60)


class FlakyCachePlugin:
    @hookimpl
    def register_cache_backends(self) -> list[CacheBackendType]:
        return [CacheBackendType(name="flaky", description="test", factory=lambda section, settings: FlakyCache())]


@pytest.fixture
def flaky_pm(pm: pluggy.PluginManager) -> Any:
    pm.register(FlakyCachePlugin(), name="test-flaky-cache")
    yield pm
    pm.unregister(name="test-flaky-cache")


async def test_cache_failing_is_degraded_not_down(
    make_client: ClientFactory, flaky_pm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(cache={"type": "flaky"})
    client.app[appkeys.CACHE].mode = "fail"
    response = await client.get(HEALTH)
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["cache"].startswith("error: ConnectionError") and "cache went away" in caplog.text


async def test_a_hanging_check_is_reported_within_the_health_timeout(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "HEALTH_CHECK_TIMEOUT", 0.2)
    client = await make_client(storage={"type": "tiny"})
    storage = client.app[appkeys.STORAGE]

    async def hang() -> None:
        await asyncio.sleep(60)

    storage.ping = hang
    started = time.monotonic()
    response = await client.get(HEALTH)
    assert time.monotonic() - started < 5
    assert response.status == 503
    assert (await response.json())["checks"]["storage"] == "error: no answer within 0.2s"


# --- admin API access --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/admin/tokens"),
        ("POST", "/api/v1/admin/tokens"),
        ("DELETE", "/api/v1/admin/tokens/x"),
        ("GET", "/api/v1/admin/ip-blocks"),
        ("POST", "/api/v1/admin/ip-blocks"),
        ("DELETE", "/api/v1/admin/ip-blocks/192.0.2.1"),
        ("PUT", "/api/v1/admin/banner"),
        ("DELETE", "/api/v1/admin/banner"),
        ("GET", "/api/v1/admin/audit-log"),
        ("GET", "/api/v1/admin/plugins"),
        ("GET", "/api/v1/admin/quota/reg/alice"),
    ],
)
async def test_admin_endpoints_need_the_admin_role(make_client: ClientFactory, method: str, path: str) -> None:
    client = await make_client(registries=[ping_registry()])
    anonymous = await client.request(method, path, json={})
    assert anonymous.status == 401
    assert "error" in await anonymous.json()
    user = await client.request(method, path, json={}, headers=USER)
    assert user.status == 403
    assert (await user.json())["error"] == "admin role required"


async def test_admin_reads_succeed(make_client: ClientFactory) -> None:
    client = await make_client(registries=[ping_registry()])
    for path in ("/api/v1/admin/tokens", "/api/v1/admin/ip-blocks", "/api/v1/admin/audit-log"):
        response = await client.get(path, headers=ADMIN)
        assert response.status == 200, path
    plugins = await (await client.get("/api/v1/admin/plugins", headers=ADMIN)).json()
    names = {p["name"] for p in plugins["plugins"]}
    assert {"batlehub.builtin.cache_memory", "test-tiny-storage"} <= names
    quota = await (await client.get("/api/v1/admin/quota/reg/alice", headers=ADMIN)).json()
    assert quota["used_versions"] == 0 and quota["max_versions"] == 0
    missing = await client.get("/api/v1/admin/quota/nope/alice", headers=ADMIN)
    assert missing.status == 404


async def test_unknown_token_is_401_not_anonymous(make_client: ClientFactory) -> None:
    client = await make_client(registries=[ping_registry()])
    response = await client.get("/registries/reg/ping", headers={"Authorization": "Bearer nope-nope"})
    assert response.status == 401
    malformed = await client.get("/registries/reg/ping", headers={"Authorization": "Basic %%%"})
    assert malformed.status == 401
    assert (await malformed.json())["error"] == "malformed Basic credentials"


@BOTH_DATABASES
async def test_tokens_create_use_revoke(make_client: ClientFactory, database_raw: dict[str, Any]) -> None:
    client = await make_client(registries=[ping_registry()], database=database_raw)
    created = await client.post(
        "/api/v1/admin/tokens", json={"user_id": "gina", "role": "user", "expires_in_days": 30}, headers=ADMIN
    )
    assert created.status == 201
    record = await created.json()
    token = record["token"]
    assert record["user_id"] == "gina" and record["role"] == "user" and epoch(record["expires"]) > time.time()

    bearer = {"Authorization": f"Bearer {token}"}
    pong = await client.get("/registries/reg/ping", headers=bearer)
    assert pong.status == 200
    assert (await pong.json())["user"] == "gina"
    assert (await client.get("/api/v1/admin/tokens", headers=bearer)).status == 403  # a user token

    listing = await (await client.get("/api/v1/admin/tokens", headers=ADMIN)).json()
    assert [t["id"] for t in listing["tokens"]] == [record["id"]]
    assert token not in json.dumps(listing)

    revoked = await client.delete(f"/api/v1/admin/tokens/{record['id']}", headers=ADMIN)
    assert revoked.status == 200
    assert (await client.get("/registries/reg/ping", headers=bearer)).status == 401
    again = await client.delete(f"/api/v1/admin/tokens/{record['id']}", headers=ADMIN)
    assert again.status == 404


async def test_admin_token_created_over_the_api_is_an_admin(make_client: ClientFactory) -> None:
    client = await make_client()
    record = await (
        await client.post("/api/v1/admin/tokens", json={"user_id": "ops", "role": "admin"}, headers=ADMIN)
    ).json()
    response = await client.get("/api/v1/admin/tokens", headers={"Authorization": f"Bearer {record['token']}"})
    assert response.status == 200


async def test_first_start_token_works_against_the_api(
    aiohttp_client: Any, tmp_path: Path, pm: pluggy.PluginManager
) -> None:
    settings = parse_settings({"registries": []}, data_dir=tmp_path)
    client = await aiohttp_client(create_app(settings, pm))
    token = (tmp_path / "admin.token").read_text().strip()
    response = await client.get("/api/v1/admin/tokens", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200
    assert [t["description"] for t in (await response.json())["tokens"]] == ["first-start admin token"]


# --- registries and permissions over HTTP ------------------------------------------------------------


async def test_registry_permissions_over_http(make_client: ClientFactory) -> None:
    client = await make_client(
        registries=[
            ping_registry("public"),
            ping_registry("private", rbac={"anonymous": [], "user": ["releases:read"]}),
        ]
    )
    assert (await client.get("/registries/public/ping")).status == 200
    denied = await client.get("/registries/private/ping")
    assert denied.status == 401
    assert "WWW-Authenticate" in denied.headers
    assert (await client.get("/registries/private/ping", headers=USER)).status == 200
    forbidden = await client.put("/registries/private/publish", headers=USER)
    assert forbidden.status == 403
    assert "'alice' may not publish" in (await forbidden.json())["error"]
    assert (await client.put("/registries/public/publish", headers=USER)).status == 201
    assert (await client.put("/registries/private/publish", headers=ADMIN)).status == 201

    anonymous = await (await client.get("/api/v1/registries")).json()
    assert [r["name"] for r in anonymous["registries"]] == ["public"]
    user = await (await client.get("/api/v1/registries", headers=USER)).json()
    assert [r["name"] for r in user["registries"]] == ["public", "private"]
    assert user["registries"][0]["url"] == f"http://{client.host}:{client.port}/registries/public/"


async def test_errors_are_json(make_client: ClientFactory) -> None:
    client = await make_client(registries=[ping_registry()])
    response = await client.get("/registries/reg/no-such-route")
    assert response.status == 404
    assert response.content_type == "application/json"
    assert "error" in await response.json()
    wrong_method = await client.post("/api/v1/banner")
    assert wrong_method.status == 405
    assert "error" in await wrong_method.json()


# --- IP blocks and client IP ---------------------------------------------------------------------------


async def test_ip_block_via_admin_api(make_client: ClientFactory) -> None:
    client = await make_client(registries=[ping_registry()])
    added = await client.post(
        "/api/v1/admin/ip-blocks", json={"ip": "127.0.0.1", "reason": "testing", "duration_secs": 600}, headers=ADMIN
    )
    assert added.status == 201
    block = await added.json()
    assert block["ip"] == "127.0.0.1" and block["expires_at"] == pytest.approx(time.time() + 600, abs=30)

    refused = await client.get("/registries/reg/ping", headers=ADMIN)
    assert refused.status == 403
    assert int(refused.headers["X-Block-Expires"]) == int(block["expires_at"])
    assert "blocked until" in (await refused.json())["error"]
    # Health never looks at blocks: a load balancer probing from that address keeps working.
    assert (await client.get(HEALTH)).status == 200
    assert (await client.get("/api/v1/admin/ip-blocks", headers=ADMIN)).status == 403


async def test_ip_block_list_and_remove(make_client: ClientFactory) -> None:
    client = await make_client(registries=[ping_registry()])
    await client.post("/api/v1/admin/ip-blocks", json={"ip": "2001:db8::1"}, headers=ADMIN)
    listing = await (await client.get("/api/v1/admin/ip-blocks", headers=ADMIN)).json()
    assert [b["ip"] for b in listing["blocks"]] == ["2001:db8::1"]
    assert (await client.delete("/api/v1/admin/ip-blocks/2001:db8::1", headers=ADMIN)).status == 200
    assert (await (await client.get("/api/v1/admin/ip-blocks", headers=ADMIN)).json())["blocks"] == []
    assert (await client.delete("/api/v1/admin/ip-blocks/2001:db8::1", headers=ADMIN)).status == 404


async def test_forged_forwarded_for_from_untrusted_peer_is_ignored(make_client: ClientFactory) -> None:
    client = await make_client(registries=[ping_registry()])
    await client.post("/api/v1/admin/ip-blocks", json={"ip": "198.51.100.9"}, headers=ADMIN)
    # Pretending to be the blocked address does not get you blocked...
    forged = await client.get("/registries/reg/ping", headers={"X-Forwarded-For": "198.51.100.9"})
    assert forged.status == 200
    # ...and pretending to be someone else does not get you out of your own block.
    await client.post("/api/v1/admin/ip-blocks", json={"ip": "127.0.0.1"}, headers=ADMIN)
    escape = await client.get(
        "/registries/reg/ping", headers={"X-Forwarded-For": "203.0.113.5", "X-Real-IP": "203.0.113.5"}
    )
    assert escape.status == 403


async def test_forwarded_for_from_trusted_proxy_is_walked_from_the_right(make_client: ClientFactory) -> None:
    client = await make_client(registries=[ping_registry()], server={"trusted_proxies": ["127.0.0.1/32"]})
    await client.post("/api/v1/admin/ip-blocks", json={"ip": "198.51.100.9"}, headers=ADMIN)
    # The proxy appended the client it saw; trusted hops at the right end are skipped.
    blocked = await client.get("/registries/reg/ping", headers={"X-Forwarded-For": "198.51.100.9, 127.0.0.1"})
    assert blocked.status == 403
    # A client that prepends the blocked address itself is judged by the address the proxy saw.
    spoofed = await client.get("/registries/reg/ping", headers={"X-Forwarded-For": "198.51.100.9, 192.0.2.44"})
    assert spoofed.status == 200
    # The client IP lands in the audit log of admin actions.
    await client.put("/api/v1/banner", json={})  # (405, ignored)
    await client.put("/api/v1/admin/banner", json={"message": "hi"}, headers={**ADMIN, "X-Forwarded-For": "192.0.2.77"})
    log = await (await client.get("/api/v1/admin/audit-log?action=banner.set", headers=ADMIN)).json()
    assert log["entries"][0]["client_ip"] == "192.0.2.77"


async def test_trusted_proxy_cannot_be_blocked(make_client: ClientFactory) -> None:
    client = await make_client(server={"trusted_proxies": ["10.0.0.0/8"]})
    response = await client.post("/api/v1/admin/ip-blocks", json={"ip": "10.1.2.3"}, headers=ADMIN)
    assert response.status == 400
    assert "trusted_proxies" in (await response.json())["error"]


async def test_automatic_block_after_repeated_401s(make_client: ClientFactory) -> None:
    client = await make_client(
        registries=[ping_registry()],
        ip_blocking={"enabled": True, "violation_threshold": 3, "ban_duration_secs": 120, "trigger_on_status": [401]},
    )
    bad = {"Authorization": "Bearer wrong-token"}
    for _ in range(3):
        assert (await client.get("/registries/reg/ping", headers=bad)).status == 401
    blocked = await client.get("/registries/reg/ping", headers=ADMIN)  # even with a good token now
    assert blocked.status == 403
    assert int(blocked.headers["X-Block-Expires"]) == pytest.approx(time.time() + 120, abs=30)
    assert (await client.get(HEALTH)).status == 200


async def test_no_automatic_block_below_the_threshold_or_when_disabled(make_client: ClientFactory) -> None:
    client = await make_client(registries=[ping_registry()], ip_blocking={"violation_threshold": 2})
    bad = {"Authorization": "Bearer wrong-token"}
    for _ in range(4):
        assert (await client.get("/registries/reg/ping", headers=bad)).status == 401
    assert (await client.get("/registries/reg/ping")).status == 200  # ip_blocking.enabled is false


async def test_trusted_proxy_is_never_banned_but_clients_behind_it_are(make_client: ClientFactory) -> None:
    client = await make_client(
        registries=[ping_registry()],
        server={"trusted_proxies": ["127.0.0.1/32"]},
        ip_blocking={"enabled": True, "violation_threshold": 2, "trigger_on_status": [401]},
    )
    bad = {"Authorization": "Bearer wrong-token"}
    for _ in range(3):  # health checks and the like straight from the proxy: never counted
        assert (await client.get("/registries/reg/ping", headers=bad)).status == 401
    assert (await client.get("/registries/reg/ping")).status == 200
    attacker = {**bad, "X-Forwarded-For": "198.51.100.20"}
    for _ in range(2):
        assert (await client.get("/registries/reg/ping", headers=attacker)).status == 401
    assert (await client.get("/registries/reg/ping", headers={"X-Forwarded-For": "198.51.100.20"})).status == 403
    assert (await client.get("/registries/reg/ping", headers={"X-Forwarded-For": "198.51.100.21"})).status == 200
    blocks = await (await client.get("/api/v1/admin/ip-blocks", headers=ADMIN)).json()
    assert [b["ip"] for b in blocks["blocks"]] == ["198.51.100.20"]


async def test_unblock_accepts_any_spelling_of_the_address(make_client: ClientFactory) -> None:
    client = await make_client()
    await client.post("/api/v1/admin/ip-blocks", json={"ip": "2001:DB8:0:0::7"}, headers=ADMIN)
    listing = await (await client.get("/api/v1/admin/ip-blocks", headers=ADMIN)).json()
    assert [b["ip"] for b in listing["blocks"]] == ["2001:db8::7"]
    assert (await client.delete("/api/v1/admin/ip-blocks/2001:DB8:0:0::7", headers=ADMIN)).status == 200


# --- rate limits --------------------------------------------------------------------------------------


async def test_rate_limit(make_client: ClientFactory) -> None:
    client = await make_client(
        registries=[ping_registry(rate_limit={"requests_per_window": 3, "window_secs": 60}), ping_registry("free")]
    )
    remaining = []
    for _ in range(3):
        response = await client.get("/registries/reg/ping")
        assert response.status == 200
        assert response.headers["X-RateLimit-Limit"] == "3"
        remaining.append(response.headers["X-RateLimit-Remaining"])
    assert remaining == ["2", "1", "0"]
    limited = await client.get("/registries/reg/ping")
    assert limited.status == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert limited.headers["X-RateLimit-Remaining"] == "0"
    assert int(limited.headers["X-RateLimit-Reset"]) == int(limited.headers["Retry-After"])
    assert "rate limit" in (await limited.json())["error"]
    # Counted per user for authenticated callers: alice has her own budget.
    assert (await client.get("/registries/reg/ping", headers=USER)).status == 200
    # Other registries and the admin API are not limited by this registry's setting.
    assert (await client.get("/registries/free/ping")).status == 200
    assert "X-RateLimit-Limit" not in (await client.get("/registries/free/ping")).headers
    assert (await client.get(HEALTH)).status == 200


async def test_rate_limit_counts_anonymous_clients_by_their_forwarded_address(make_client: ClientFactory) -> None:
    client = await make_client(
        registries=[ping_registry(rate_limit={"requests_per_window": 1})],
        server={"trusted_proxies": ["127.0.0.1/32"]},
    )
    first = {"X-Forwarded-For": "198.51.100.1"}
    assert (await client.get("/registries/reg/ping", headers=first)).status == 200
    assert (await client.get("/registries/reg/ping", headers=first)).status == 429
    assert (await client.get("/registries/reg/ping", headers={"X-Forwarded-For": "198.51.100.2"})).status == 200


async def test_rate_limit_headers_ride_on_errors_too(make_client: ClientFactory) -> None:
    client = await make_client(registries=[ping_registry(rate_limit={"requests_per_window": 5})])
    response = await client.put("/registries/reg/publish")  # anonymous may not publish
    assert response.status == 401
    assert response.headers["X-RateLimit-Remaining"] == "4"


# --- banner and audit log ---------------------------------------------------------------------------


async def test_banner_set_get_clear(make_client: ClientFactory) -> None:
    client = await make_client()
    assert await (await client.get("/api/v1/banner")).json() == {"message": None}
    put = await client.put(
        "/api/v1/admin/banner", json={"message": "maintenance at 18:00", "level": "warning"}, headers=ADMIN
    )
    assert put.status == 200
    assert await (await client.get("/api/v1/banner")).json() == {"message": "maintenance at 18:00", "level": "warning"}
    assert (await client.delete("/api/v1/admin/banner", headers=ADMIN)).status == 200
    assert await (await client.get("/api/v1/banner")).json() == {"message": None}


@BOTH_DATABASES
async def test_audit_log_records_admin_changes_with_filters_and_paging(
    make_client: ClientFactory, database_raw: dict[str, Any]
) -> None:
    client = await make_client(database=database_raw)
    token = await (await client.post("/api/v1/admin/tokens", json={"user_id": "hal"}, headers=ADMIN)).json()
    await client.delete(f"/api/v1/admin/tokens/{token['id']}", headers=ADMIN)
    await client.put("/api/v1/admin/banner", json={"message": "hello"}, headers=ADMIN)
    await client.delete("/api/v1/admin/banner", headers=ADMIN)
    await client.post("/api/v1/admin/ip-blocks", json={"ip": "192.0.2.10", "reason": "abuse"}, headers=ADMIN)
    await client.delete("/api/v1/admin/ip-blocks/192.0.2.10", headers=ADMIN)
    await client.get("/api/v1/admin/tokens", headers=USER)  # denied: recorded as such

    everything = await (await client.get("/api/v1/admin/audit-log?user=root", headers=ADMIN)).json()
    actions = [e["action"] for e in everything["entries"]]
    assert actions == [
        "ip_block.remove",
        "ip_block.add",
        "banner.clear",
        "banner.set",
        "token.revoke",
        "token.create",
    ]  # newest first
    assert everything["total"] == 6
    created = everything["entries"][-1]
    assert created["target"] == token["id"] and created["client_ip"] == "127.0.0.1" and created["result"] == "ok"
    assert json.loads(created["detail"]) == {"role": "user", "user_id": "hal"}
    assert token["token"] not in json.dumps(everything)

    only = await (await client.get("/api/v1/admin/audit-log?action=ip_block.add", headers=ADMIN)).json()
    assert [e["target"] for e in only["entries"]] == ["192.0.2.10"]
    assert json.loads(only["entries"][0]["detail"])["reason"] == "abuse"

    page = await (await client.get("/api/v1/admin/audit-log?user=root&limit=2&offset=2", headers=ADMIN)).json()
    assert [e["action"] for e in page["entries"]] == ["banner.clear", "banner.set"]
    assert page["total"] == 6 and page["limit"] == 2 and page["offset"] == 2

    denied = await (await client.get("/api/v1/admin/audit-log?denied_only=1", headers=ADMIN)).json()
    assert [(e["user_id"], e["result"]) for e in denied["entries"]] == [("alice", "denied")]

    future = await (await client.get(f"/api/v1/admin/audit-log?since={time.time() + 60}", headers=ADMIN)).json()
    assert future["entries"] == [] and future["total"] == 0

    bad = await client.get("/api/v1/admin/audit-log?limit=abc", headers=ADMIN)
    assert bad.status == 400
    for query in ("limit=0", "limit=5000", "offset=-1", "limit=inf", "since=nan"):
        assert (await client.get(f"/api/v1/admin/audit-log?{query}", headers=ADMIN)).status == 400, query


# --- bad admin bodies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "error"),
    [
        ("POST", "/api/v1/admin/tokens", b"{not json", "request body is not valid JSON"),
        ("POST", "/api/v1/admin/tokens", b"[1, 2]", "request body must be a JSON object"),
        ("POST", "/api/v1/admin/tokens", b'{"user_id": 5}', "user_id: expected 1 to 200 printable characters"),
        ("POST", "/api/v1/admin/tokens", b'{"user_id": "eve\\nforged"}', "user_id: expected 1 to 200 printable"),
        ("POST", "/api/v1/admin/tokens", b'{"user_id": "x", "role": "root"}', 'role: expected "user", "admin"'),
        ("POST", "/api/v1/admin/tokens", b'{"user_id": "x", "expires_in_days": "soon"}', "expires_in_days:"),
        ("POST", "/api/v1/admin/ip-blocks", b'{"ip": "999.1.1.1"}', "ip: expected an IPv4 or IPv6 address"),
        ("POST", "/api/v1/admin/ip-blocks", b'{"ip": "192.0.2.1", "duration_secs": -5}', "duration_secs:"),
        ("POST", "/api/v1/admin/ip-blocks", b'{"ip": "192.0.2.1", "reason": 7}', "reason:"),
        ("PUT", "/api/v1/admin/banner", b'{"message": ""}', "message:"),
        ("PUT", "/api/v1/admin/banner", b'{"message": "hi", "level": "loud"}', "level:"),
        ("PUT", "/api/v1/admin/banner", b"\xff\xfe", "request body is not valid JSON"),
        # Python's json reads these; as durations they would never run out.
        ("POST", "/api/v1/admin/tokens", b'{"user_id": "x", "expires_in_days": NaN}', "request body is not valid"),
        ("POST", "/api/v1/admin/ip-blocks", b'{"ip": "192.0.2.1", "duration_secs": Infinity}', "request body is"),
        ("POST", "/api/v1/admin/tokens", b'{"user_id": "x", "expires_in_days": 1e308}', "expires_in_days:"),
    ],
)
async def test_bad_admin_bodies_are_400_with_a_clear_error(
    make_client: ClientFactory, method: str, path: str, body: bytes, error: str
) -> None:
    client = await make_client()
    response = await client.request(method, path, data=body, headers={**ADMIN, "Content-Type": "application/json"})
    assert response.status == 400
    assert (await response.json())["error"].startswith(error)


# --- CORS ------------------------------------------------------------------------------------------------


async def test_cors_for_allowed_origins_only(make_client: ClientFactory) -> None:
    allowed = "http://ui.localhost:3000"
    client = await make_client(server={"cors_allowed_origins": [allowed]})
    preflight = await client.options(
        "/api/v1/admin/tokens",
        headers={
            "Origin": allowed,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == allowed
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()

    simple = await client.get("/api/v1/banner", headers={"Origin": allowed})
    assert simple.headers["Access-Control-Allow-Origin"] == allowed
    assert "Origin" in simple.headers["Vary"]
    denied = await client.get("/api/v1/admin/tokens", headers={"Origin": allowed})
    assert denied.status == 401
    assert denied.headers["Access-Control-Allow-Origin"] == allowed  # so the UI can read the error

    other = "http://evil.localhost"
    foreign_preflight = await client.options(
        "/api/v1/admin/tokens", headers={"Origin": other, "Access-Control-Request-Method": "POST"}
    )
    assert "Access-Control-Allow-Origin" not in foreign_preflight.headers
    foreign = await client.get("/api/v1/banner", headers={"Origin": other})
    assert foreign.status == 200
    assert "Access-Control-Allow-Origin" not in foreign.headers


async def test_no_cors_by_default(make_client: ClientFactory) -> None:
    client = await make_client()
    response = await client.get("/api/v1/banner", headers={"Origin": "http://ui.localhost"})
    assert "Access-Control-Allow-Origin" not in response.headers


# --- static UI ---------------------------------------------------------------------------------------------


@pytest.fixture
def static_dir(tmp_path: Path) -> Path:
    root = tmp_path / "ui"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text("<html>batlehub ui</html>")
    (root / "assets" / "app.js").write_text("console.log('ui')")
    (tmp_path / "secret.txt").write_text("top secret")
    (root / "escape.txt").symlink_to(tmp_path / "secret.txt")
    return root


async def test_static_ui_and_spa_fallback(make_client: ClientFactory, static_dir: Path) -> None:
    client = await make_client(server={"static_dir": str(static_dir)}, registries=[ping_registry()])
    index = await client.get("/")
    assert index.status == 200
    assert await index.text() == "<html>batlehub ui</html>"
    asset = await client.get("/assets/app.js")
    assert asset.status == 200
    assert await asset.text() == "console.log('ui')"
    assert "javascript" in asset.headers["Content-Type"]
    deep = await client.get("/packages/@scope/name")
    assert deep.status == 200
    assert await deep.text() == "<html>batlehub ui</html>"
    # The API and registries are not swallowed by the fallback.
    assert (await client.get(HEALTH)).status == 200
    assert (await client.get("/registries/reg/ping")).status == 200
    api_miss = await client.get("/api/v1/nothing-here")
    assert api_miss.status == 404
    assert "error" in await api_miss.json()


@pytest.mark.parametrize(
    "path",
    [
        "/..%2fsecret.txt",
        "/assets/..%2f..%2fsecret.txt",
        "/%2e%2e/secret.txt",
        "/escape.txt",
        "/" + "%2F" + "etc/passwd",
    ],
)
async def test_static_ui_never_serves_outside_its_directory(
    make_client: ClientFactory, static_dir: Path, path: str
) -> None:
    client = await make_client(server={"static_dir": str(static_dir)})
    response = await client.get(URL(path, encoded=True))
    text = await response.text()
    assert "top secret" not in text
    assert "root:" not in text
    assert response.status in (200, 404)


@pytest.mark.parametrize("path", ["/%00", "/assets/a%00b.js", "/" + "a" * 5000])
async def test_static_ui_odd_paths_are_not_server_errors(
    make_client: ClientFactory, static_dir: Path, path: str
) -> None:
    client = await make_client(server={"static_dir": str(static_dir)})
    response = await client.get(URL(path, encoded=True))
    assert response.status == 200
    assert await response.text() == "<html>batlehub ui</html>"


def epoch(rfc3339: str) -> float:
    """The admin API's times are RFC 3339 strings."""
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


async def test_the_front_page_says_how_to_use_each_registry(aiohttp_client: Any, tmp_path: Path) -> None:
    pytest.importorskip("batlehub_npm")
    settings = parse_settings({"registries": [{"type": "npm", "name": "npm", "mode": "local"}]}, data_dir=tmp_path)
    client = await aiohttp_client(create_app(settings))
    response = await client.get("/")
    assert response.status == 200 and response.content_type == "text/html"
    page = await response.text()
    assert f"registry=http://{client.host}:{client.port}/registries/npm/" in page
    assert "local packages only" in page
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
