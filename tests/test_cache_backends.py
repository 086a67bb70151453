"""The built-in cache backends: the shared contract against `memory` and a real PostgreSQL, plus
what only one of them does (the memory cap, the postgres tables, the factories' config checks)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from batlehub.app import validate_config
from batlehub.builtin import cache_memory, cache_postgres
from batlehub.builtin.cache_memory import MemoryCache
from batlehub.builtin.cache_postgres import PostgresCache
from batlehub.config import DatabaseSettings, Settings
from batlehub.errors import ConfigError
from batlehub.interfaces import CacheBackendType
from batlehub.plugins import flatten, get_plugin_manager

# An editable install is not rewritten by pytest on its own; without this a failing contract
# assertion would say only "AssertionError".
pytest.register_assert_rewrite("batlehub.testing.cache_contract")
from batlehub.testing.cache_contract import CacheBackendContract, cache_type_named  # noqa: E402


async def _drop_tables(url: str, prefix: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        names = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE $1",
            prefix.replace("_", r"\_") + "%",
        )
        for row in names:
            await conn.execute(f'DROP TABLE IF EXISTS "{row["tablename"]}"')
    finally:
        await conn.close()


class TestMemoryCache(CacheBackendContract):
    shared = False

    @pytest.fixture
    async def cache(self) -> AsyncIterator[MemoryCache]:
        backend = MemoryCache()
        await backend.open()
        yield backend
        await backend.close()

    @pytest.fixture
    def cache_type(self) -> CacheBackendType:
        return cache_type_named("memory")

    @pytest.fixture
    def cache_config(self) -> dict[str, Any]:
        return {}


class TestPostgresCache(CacheBackendContract):
    @pytest.fixture
    async def cache(self, postgres_url: str, namespace: str) -> AsyncIterator[PostgresCache]:
        backend = PostgresCache(postgres_url, table_prefix=namespace)
        await backend.open()
        yield backend
        await backend.close()
        await _drop_tables(postgres_url, namespace)

    @pytest.fixture
    def cache_type(self) -> CacheBackendType:
        return cache_type_named("postgres")

    @pytest.fixture
    def cache_config(self, postgres_url: str, namespace: str) -> dict[str, Any]:
        return {"url": postgres_url, "table_prefix": namespace}

    @pytest.fixture
    async def cache_peer(self, postgres_url: str, namespace: str, cache: PostgresCache) -> AsyncIterator[PostgresCache]:
        backend = PostgresCache(postgres_url, table_prefix=namespace)
        await backend.open()
        yield backend
        await backend.close()


# --- memory only -----------------------------------------------------------------------------------


async def test_memory_cache_is_bounded() -> None:
    cache = MemoryCache(max_entries=3)
    for name in ("a", "b", "c"):
        await cache.set(name, name.encode(), ttl_secs=60)
    assert await cache.get("a") == b"a"  # now the most recently used
    await cache.set("d", b"d", ttl_secs=60)
    assert await cache.get_stale("b") is None  # the least recently used went first
    assert [await cache.get(k) for k in ("a", "c", "d")] == [b"a", b"c", b"d"]


async def test_memory_cache_sweeps_expired_counters_and_leases() -> None:
    cache = MemoryCache()
    for i in range(cache_memory._SWEEP_EVERY):
        await cache.incr_window(f"ip:{i}", 0.05)
    await asyncio.sleep(0.1)
    for i in range(cache_memory._SWEEP_EVERY):
        await cache.acquire_lease(f"lease:{i}", "me", 0.05)
    assert len(cache._counters) < cache_memory._SWEEP_EVERY


# --- postgres only ---------------------------------------------------------------------------------


async def test_postgres_replicas_opening_together_create_tables_once(postgres_url: str) -> None:
    prefix = "t_race_" + str(id(object()))[-8:] + "_"
    replicas = [PostgresCache(postgres_url, table_prefix=prefix) for _ in range(6)]
    try:
        await asyncio.gather(*(r.open() for r in replicas))
        await replicas[0].set("k", b"v", ttl_secs=60)
        assert await replicas[5].get("k") == b"v"
    finally:
        await asyncio.gather(*(r.close() for r in replicas))
        await _drop_tables(postgres_url, prefix)


async def test_postgres_sweep_deletes_only_expired_rows(postgres_url: str) -> None:
    prefix = "t_sweep_" + str(id(object()))[-8:] + "_"
    cache = PostgresCache(postgres_url, table_prefix=prefix)
    await cache.open()
    try:
        await cache.set("gone", b"x", ttl_secs=0.05, stale_retention_secs=0.05)
        await cache.set("kept", b"y", ttl_secs=0.05, stale_retention_secs=60)
        await cache.acquire_lease("lapsed", "me", 0.05)
        await cache.incr_window("old", 0.05)
        await asyncio.sleep(0.3)
        assert await cache.sweep() == 3
        assert await cache.get_stale("kept") == b"y"
    finally:
        await cache.close()
        await _drop_tables(postgres_url, prefix)


async def test_postgres_ping_raises_when_unreachable(unused_tcp_port: int) -> None:
    cache = PostgresCache(f"postgresql://postgres@127.0.0.1:{unused_tcp_port}/none")
    with pytest.raises(OSError):
        await cache.open()
    with pytest.raises(Exception, match="not open"):
        await cache.ping()


# --- descriptors and factories ---------------------------------------------------------------------


def _settings(tmp_path: Path, db_url: str = "") -> Settings:
    database = DatabaseSettings(type="postgresql", url=db_url) if db_url else DatabaseSettings()
    return Settings(data_dir=tmp_path, database=database)


def _postgres_config(table: dict[str, Any], settings: Settings | None) -> Any:
    (postgres,) = cache_postgres.register_cache_backends()
    return validate_config(postgres, table, path="cache", settings=settings)


def test_builtins_register_their_cache_backends() -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    types = {t.name: t for t in flatten(pm.hook.register_cache_backends())}
    assert types["memory"].shared is False
    assert types["memory"].config_model.model_fields == {}
    assert types["postgres"].shared is True
    assert set(types["postgres"].config_model.model_fields) == {"url", "table_prefix"}


def test_memory_factory(tmp_path: Path) -> None:
    (memory,) = cache_memory.register_cache_backends()
    config = validate_config(memory, {"type": "memory"}, path="cache")
    assert isinstance(memory.factory(config, _settings(tmp_path)), MemoryCache)


def test_postgres_url_defaults_to_the_database(tmp_path: Path) -> None:
    (postgres,) = cache_postgres.register_cache_backends()
    settings = _settings(tmp_path, "postgresql://db.internal/hub")
    cache = postgres.factory(_postgres_config({"type": "postgres"}, settings), settings)
    assert isinstance(cache, PostgresCache)
    assert cache.url == "postgresql://db.internal/hub"
    assert cache.table_prefix == "batlehub_cache_"
    table = {"type": "postgres", "url": "postgresql://cache.internal/c", "table_prefix": "hub2_"}
    own = postgres.factory(_postgres_config(table, settings), settings)
    assert (own.url, own.table_prefix) == ("postgresql://cache.internal/c", "hub2_")


def test_postgres_config_needs_a_postgres_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _postgres_config({"type": "postgres"}, _settings(tmp_path))
    assert info.value.problems == ['cache.url: required for the postgres cache (or set database.type = "postgresql")']
    with pytest.raises(ConfigError) as info:
        _postgres_config({"type": "postgres", "url": "redis://x"}, _settings(tmp_path))
    assert info.value.problems == ["cache.url: expected a postgresql:// URL, got 'redis://x'"]
    with pytest.raises(ConfigError) as info:
        _postgres_config(
            {"type": "postgres", "table_prefix": "x; DROP TABLE y"}, _settings(tmp_path, "postgresql://h/d")
        )
    assert info.value.problems == [
        "cache.table_prefix: expected lowercase letters, digits and _ (at most 40), got 'x; DROP TABLE y'"
    ]


def test_postgres_url_requirement_waits_for_valid_core_settings() -> None:
    """Without core settings (check-config of a file with core problems) the model cannot know
    database.url, so it does not guess; the core's problems come first."""
    assert _postgres_config({"type": "postgres"}, None).url is None
