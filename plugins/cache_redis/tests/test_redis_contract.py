"""The redis cache backend against a real redis-server: the shared contract, what happens while
Redis is down, and how the plugin registers itself."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import batlehub_cache_redis
import pytest
from batlehub_cache_redis import RedisCache
from batlehub_cache_redis import backend as redis_backend

from batlehub.app import validate_config
from batlehub.config import Settings
from batlehub.errors import ConfigError, ServiceUnavailable, StartupError
from batlehub.interfaces import Banner, CacheBackendType, IpBlock
from batlehub.plugins import flatten, get_plugin_manager

# An editable install is not rewritten by pytest on its own; without this a failing contract
# assertion would say only "AssertionError".
pytest.register_assert_rewrite("batlehub.testing.cache_contract")
from batlehub.testing.cache_contract import CacheBackendContract, cache_type_named  # noqa: E402


class TestRedisCache(CacheBackendContract):
    @pytest.fixture
    async def cache(self, redis_url: str, namespace: str) -> AsyncIterator[RedisCache]:
        backend = RedisCache(redis_url, prefix=f"test:{namespace}:")
        await backend.open()
        yield backend
        await _delete_namespace(backend)
        await backend.close()

    @pytest.fixture
    async def cache_peer(self, redis_url: str, namespace: str, cache: RedisCache) -> AsyncIterator[RedisCache]:
        backend = RedisCache(redis_url, prefix=f"test:{namespace}:")
        await backend.open()
        yield backend
        await backend.close()

    @pytest.fixture
    def cache_type(self) -> CacheBackendType:
        return cache_type_named("redis")

    @pytest.fixture
    def cache_config(self, redis_url: str, namespace: str) -> dict[str, Any]:
        return {"url": redis_url, "prefix": f"test:{namespace}:"}


async def _delete_namespace(cache: RedisCache) -> None:
    client: Any = cache._client
    keys = [key async for key in client.scan_iter(match=f"{cache.prefix}*")]
    if keys:
        await client.delete(*keys)


# --- Redis down --------------------------------------------------------------------------------------


async def _wait_until_answering(cache: RedisCache, within_secs: float = 10.0) -> None:
    deadline = time.monotonic() + within_secs
    while True:
        try:
            await cache.ping()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_degrades_while_redis_is_down_and_recovers_by_itself(
    redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cache = RedisCache(redis_server.url, prefix="test:outage:")
    await cache.open()
    try:
        await cache.set("doc", b"cached", ttl_secs=60)
        assert await cache.acquire_lease("fetch", "replica-1", 60)
        now = time.time()
        await cache.block_ip(IpBlock("192.0.2.1", "abuse", expires_at=now + 60, created_at=now))

        redis_server.stop()
        caplog.set_level(logging.WARNING, logger=redis_backend.__name__)

        with pytest.raises(Exception):  # noqa: B017 — any error will do: health only needs a raise
            await cache.ping()
        started = time.monotonic()
        assert await cache.get("doc") is None
        assert await cache.get_stale("doc") is None
        await cache.set("doc", b"new", ttl_secs=60)
        await cache.invalidate("doc")
        window = await cache.incr_window("user:alice", 60)
        assert window.count == 0  # fails open: the rate limiter allows the request
        assert await cache.record_violation("192.0.2.1", 60) == 0
        assert await cache.get_block("192.0.2.1") is None  # fails open
        assert await cache.get_banner() is None
        # Another replica's lease cannot be seen: grant it rather than wait forever.
        assert await cache.acquire_lease("fetch", "replica-2", 60) is True
        assert await cache.extend_lease("fetch", "replica-2", 60) is True
        assert await cache.release_lease("fetch", "replica-2") is True
        with pytest.raises(ServiceUnavailable):
            await cache.set_banner(Banner("maintenance"))
        with pytest.raises(ServiceUnavailable):
            await cache.list_blocks()
        # Nothing above hung on a timeout.
        assert time.monotonic() - started < 5

        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("rate limiting is OFF" in w for w in warnings), warnings
        assert any("IP blocks are NOT enforced" in w for w in warnings), warnings
        # Throttled: a burst of misses logs once, not once per call.
        for _ in range(20):
            await cache.get("doc")
        assert sum("metadata reads are misses" in r.getMessage() for r in caplog.records) == 1

        redis_server.start()  # empty: a restarted test Redis keeps no data
        await _wait_until_answering(cache)

        assert (await cache.incr_window("user:alice", 60)).count == 1
        assert (await cache.incr_window("user:alice", 60)).count == 2
        await cache.set("doc", b"after", ttl_secs=60)
        assert await cache.get("doc") == b"after"
        assert await cache.acquire_lease("fetch", "replica-1", 60) is True
        assert await cache.acquire_lease("fetch", "replica-2", 60) is False
        await cache.set_banner(Banner("back"))
        assert await cache.get_banner() == Banner("back")
        await cache.set_banner(None)
    finally:
        await cache.close()


async def test_calls_skip_redis_briefly_after_a_failure(redis_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Long enough that a slow restart below cannot end the back-off before we look.
    monkeypatch.setattr(redis_backend, "RETRY_AFTER_SECS", 30.0)
    cache = RedisCache(redis_server.url, prefix="test:backoff:")
    await cache.open()
    try:
        redis_server.stop()
        assert await cache.get("k") is None
        redis_server.start()
        # Inside the back-off window the cache still answers from the degraded path ...
        assert (await cache.incr_window("k", 60)).count == 0
        # ... and a successful ping (health) ends it at once.
        await _wait_until_answering(cache)
        assert (await cache.incr_window("k", 60)).count == 1
    finally:
        await cache.close()


async def test_open_fails_readably_when_redis_is_unreachable(unused_tcp_port: int) -> None:
    cache = RedisCache(f"redis://:secret@127.0.0.1:{unused_tcp_port}/0")
    with pytest.raises(StartupError) as info:
        await cache.open()
    assert "cache.url" in str(info.value)
    assert "secret" not in str(info.value)


# --- registration and config -------------------------------------------------------------------------


def test_registered_through_the_entry_point() -> None:
    (ep,) = [ep for ep in entry_points(group="batlehub") if ep.name == "redis"]
    assert ep.value == "batlehub_cache_redis"
    # Only our entry point: other plugins installed alongside must not decide this test.
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(ep.load(), name=ep.name)
    types = {t.name: t for t in flatten(pm.hook.register_cache_backends())}
    assert types["redis"].shared is True
    assert set(types["redis"].config_model.model_fields) == {"url", "prefix"}


def _build(table: dict[str, Any], settings: Settings) -> RedisCache:
    (redis_type,) = batlehub_cache_redis.register_cache_backends()
    cache = redis_type.factory(validate_config(redis_type, table, path="cache", settings=settings), settings)
    assert isinstance(cache, RedisCache)
    return cache


def test_factory_reads_url_and_prefix(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    cache = _build({"type": "redis", "url": "redis://cache:6379/2"}, settings)
    assert (cache.url, cache.prefix) == ("redis://cache:6379/2", "batlehub:")
    cache = _build({"type": "redis", "url": "rediss://cache:6380/0", "prefix": "hub2:"}, settings)
    assert cache.prefix == "hub2:"


def test_config_requires_a_redis_url(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(ConfigError) as info:
        _build({"type": "redis"}, settings)
    assert info.value.problems == ["cache.url: required (e.g. 'redis://localhost:6379/0')"]
    with pytest.raises(ConfigError) as info:
        _build({"type": "redis", "url": "postgresql://db/hub", "prefix": 3}, settings)
    assert info.value.problems == [
        "cache.url: expected a redis://, rediss:// or unix:// URL, got 'postgresql://db/hub'",
        "cache.prefix: expected a string, got 3",
    ]
