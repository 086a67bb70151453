"""The contract every `CacheBackend` must keep, as a reusable pytest class.

A backend's tests subclass `CacheBackendContract` and provide an async fixture `cache` that yields
an opened backend in a fresh namespace (a unique key prefix, table prefix or database), so tests
never see each other's state. A shared backend (`shared = True`, the default) also provides
`cache_peer`: a second instance on the same namespace, standing in for another replica. The
`cache_type` and `cache_config` fixtures let the suite check the descriptor's config model the
way the server uses it: a `[cache]` table it accepts, unknown keys refused, the factory built from
the validated model::

    class TestMyCache(CacheBackendContract):
        @pytest.fixture
        async def cache(self, namespace):
            backend = MyCache(url=..., prefix=namespace)
            await backend.open()
            yield backend
            await backend.close()

        @pytest.fixture
        async def cache_peer(self, namespace):
            ...  # the same, a second instance

        @pytest.fixture
        def cache_type(self):
            return cache_type_named("mine")        # found through the installed plugins

        @pytest.fixture
        def cache_config(self):
            return {"url": ..., "prefix": "hub:"}  # the [cache] table without `type`

The tests run against a real service: the point is to catch what only a real one does (races
between connections, server-side expiry, encodings).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from batlehub.app import validate_config
from batlehub.config import Settings
from batlehub.errors import ConfigError
from batlehub.interfaces import Banner, CacheBackend, CacheBackendType, IpBlock
from batlehub.plugins import flatten, get_plugin_manager

# Short TTLs keep the suite fast; the sleeps leave a margin for a busy, shared CI machine.
SHORT = 0.5
PAST_SHORT = 1.0

ODD_KEYS = [
    "npm:packument:npm:@scope/name",
    "with space and\ttab",
    "slashes/and\\backslashes/",
    "colons:::and%2fpercent",
    "unicode: пакет 包 🐍",
    "x" * 600,
    "",
]


def cache_type_named(name: str) -> CacheBackendType:
    """The descriptor an installed plugin registers under `name`, found the way the server finds
    it (built-ins plus `batlehub` entry points), so the test also proves the plugin is wired up."""
    for descriptor in flatten(get_plugin_manager().hook.register_cache_backends()):
        if descriptor.name == name:
            return descriptor
    raise LookupError(f"no cache backend named {name!r} is installed")


async def _open_many_connections(cache: CacheBackend) -> None:
    """Fill a pooled backend's pool first: while every call waits for a new connection, calls
    happen one after another and a race would go unnoticed."""
    await asyncio.gather(*(cache.get("warm-up") for _ in range(60)))


class CacheBackendContract:
    """Behaviour every cache backend shares. Subclass it; do not name the subclass's tests."""

    shared: bool = True
    """False for per-process backends: the `cache_peer` tests are skipped."""

    @pytest.fixture
    def namespace(self) -> str:
        """A fresh, identifier-safe name (lowercase letters, digits, `_`) for one test's state."""
        return f"t{uuid.uuid4().hex[:16]}_"

    @pytest.fixture
    async def cache(self) -> Any:
        pytest.fail("a CacheBackendContract subclass must provide the `cache` fixture")

    @pytest.fixture
    async def cache_peer(self) -> Any:
        if not self.shared:
            pytest.skip("the backend keeps state per process; there is no peer to share it with")
        pytest.fail("a shared backend's contract subclass must provide the `cache_peer` fixture")

    @pytest.fixture
    def cache_type(self) -> CacheBackendType:
        pytest.fail("a CacheBackendContract subclass must provide the `cache_type` fixture")

    @pytest.fixture
    def cache_config(self) -> Mapping[str, Any]:
        """A `[cache]` table (without `type`) that the descriptor's config model accepts."""
        pytest.fail("a CacheBackendContract subclass must provide the `cache_config` fixture")

    # --- the descriptor's config model -----------------------------------------------------------

    def test_config_model_accepts_the_known_keys(
        self, cache_type: CacheBackendType, cache_config: Mapping[str, Any], tmp_path: Path
    ) -> None:
        settings = Settings(data_dir=tmp_path)
        config = validate_config(cache_type, {"type": cache_type.name, **cache_config}, path="cache", settings=settings)
        assert isinstance(config, cache_type.config_model)
        assert isinstance(cache_type.factory(config, settings), CacheBackend)  # constructs only: no I/O
        if cache_config:  # validated configs are immutable, like the core's settings
            with pytest.raises(ValidationError):
                setattr(config, next(iter(cache_config)), None)

    def test_config_model_refuses_unknown_keys(
        self, cache_type: CacheBackendType, cache_config: Mapping[str, Any], tmp_path: Path
    ) -> None:
        assert issubclass(cache_type.config_model, BaseModel)
        with pytest.raises(ConfigError) as info:
            validate_config(
                cache_type, {**cache_config, "no_such_key": 1}, path="cache", settings=Settings(data_dir=tmp_path)
            )
        (problem,) = info.value.problems
        assert problem.startswith(f"cache.no_such_key: unknown key for type {cache_type.name!r} (known: "), problem
        for key in cache_config:  # the message lists the keys the operator could have meant
            assert key in problem, problem

    # --- shape ------------------------------------------------------------------------------------

    async def test_is_cache_backend(self, cache: Any) -> None:
        assert isinstance(cache, CacheBackend)

    async def test_ping_answers(self, cache: CacheBackend) -> None:
        await cache.ping()

    # --- metadata ---------------------------------------------------------------------------------

    async def test_missing_key_is_a_miss(self, cache: CacheBackend) -> None:
        assert await cache.get("absent") is None
        assert await cache.get_stale("absent") is None

    async def test_set_then_get(self, cache: CacheBackend) -> None:
        await cache.set("doc", b'{"name": "left-pad"}', ttl_secs=60)
        assert await cache.get("doc") == b'{"name": "left-pad"}'
        assert await cache.get_stale("doc") == b'{"name": "left-pad"}'

    async def test_binary_values_round_trip(self, cache: CacheBackend) -> None:
        value = bytes(range(256)) * 64 + b"\x00"
        await cache.set("bin", value, ttl_secs=60)
        assert await cache.get("bin") == value
        await cache.set("empty", b"", ttl_secs=60)
        assert await cache.get("empty") == b""

    async def test_set_replaces(self, cache: CacheBackend) -> None:
        await cache.set("doc", b"one", ttl_secs=60)
        await cache.set("doc", b"two", ttl_secs=60)
        assert await cache.get("doc") == b"two"

    async def test_expired_value_is_stale_not_fresh(self, cache: CacheBackend) -> None:
        await cache.set("doc", b"v1", ttl_secs=SHORT, stale_retention_secs=60)
        assert await cache.get("doc") == b"v1"
        await asyncio.sleep(PAST_SHORT)
        assert await cache.get("doc") is None
        assert await cache.get_stale("doc") == b"v1"

    async def test_set_after_expiry_makes_it_fresh_again(self, cache: CacheBackend) -> None:
        await cache.set("doc", b"v1", ttl_secs=SHORT, stale_retention_secs=60)
        await asyncio.sleep(PAST_SHORT)
        await cache.set("doc", b"v2", ttl_secs=60)
        assert await cache.get("doc") == b"v2"

    async def test_stale_value_is_dropped_after_retention(self, cache: CacheBackend) -> None:
        await cache.set("doc", b"v1", ttl_secs=0.2, stale_retention_secs=0.2)
        await asyncio.sleep(PAST_SHORT)
        assert await cache.get_stale("doc") is None

    async def test_invalidate_removes_fresh_and_stale(self, cache: CacheBackend) -> None:
        await cache.set("fresh", b"a", ttl_secs=60)
        await cache.set("stale", b"b", ttl_secs=0.1, stale_retention_secs=60)
        await asyncio.sleep(0.3)
        await cache.invalidate("fresh")
        await cache.invalidate("stale")
        await cache.invalidate("never-set")
        for key in ("fresh", "stale"):
            assert await cache.get(key) is None
            assert await cache.get_stale(key) is None

    async def test_no_ttl_never_expires(self, cache: CacheBackend) -> None:
        await cache.set("forever", b"x", ttl_secs=None, stale_retention_secs=0.1)
        await asyncio.sleep(PAST_SHORT)
        assert await cache.get("forever") == b"x"

    async def test_keys_with_odd_characters_are_distinct(self, cache: CacheBackend) -> None:
        for i, key in enumerate(ODD_KEYS):
            await cache.set(key, f"value {i}".encode(), ttl_secs=60)
        for i, key in enumerate(ODD_KEYS):
            assert await cache.get(key) == f"value {i}".encode(), key
        await cache.invalidate(ODD_KEYS[0])
        assert await cache.get(ODD_KEYS[0]) is None
        assert await cache.get(ODD_KEYS[1]) == b"value 1"
        for key in ODD_KEYS:
            assert (await cache.incr_window(key, 60)).count == 1
            assert await cache.acquire_lease(key, "me", 60)
            assert not await cache.acquire_lease(key, "you", 60)

    # --- rate-limit counters ----------------------------------------------------------------------

    async def test_incr_window_counts(self, cache: CacheBackend) -> None:
        results = [await cache.incr_window("user:alice", 60) for _ in range(3)]
        assert [r.count for r in results] == [1, 2, 3]
        for r in results:
            assert 0 < r.reset_in_secs <= 60
        assert results[2].reset_in_secs <= results[0].reset_in_secs
        assert (await cache.incr_window("user:bob", 60)).count == 1

    async def test_incr_window_starts_again_after_the_window(self, cache: CacheBackend) -> None:
        assert (await cache.incr_window("ip:1", SHORT)).count == 1
        assert (await cache.incr_window("ip:1", SHORT)).count == 2
        await asyncio.sleep(PAST_SHORT)
        after = await cache.incr_window("ip:1", SHORT)
        assert after.count == 1
        assert 0 < after.reset_in_secs <= SHORT

    async def test_concurrent_increments_are_never_lost(self, cache: CacheBackend) -> None:
        await _open_many_connections(cache)
        results = await asyncio.gather(*(cache.incr_window("hot", 60) for _ in range(200)))
        assert sorted(r.count for r in results) == list(range(1, 201))
        assert (await cache.incr_window("hot", 60)).count == 201

    # --- IP violations and blocks -----------------------------------------------------------------

    async def test_record_violation_counts_within_window(self, cache: CacheBackend) -> None:
        counts = [await cache.record_violation("192.0.2.1", 60) for _ in range(3)]
        assert counts == [1, 2, 3]
        assert await cache.record_violation("192.0.2.2", 60) == 1

    async def test_concurrent_violations_all_count(self, cache: CacheBackend) -> None:
        await _open_many_connections(cache)
        counts = await asyncio.gather(*(cache.record_violation("192.0.2.3", 60) for _ in range(30)))
        # Concurrent callers may see fewer than all the others, but none is lost for good, so a
        # burst of bad requests from one address always reaches the ban threshold.
        assert max(counts) <= 30
        assert await cache.record_violation("192.0.2.3", 60) == 31

    async def test_violations_outside_the_window_are_forgotten(self, cache: CacheBackend) -> None:
        assert await cache.record_violation("192.0.2.1", SHORT) == 1
        assert await cache.record_violation("192.0.2.1", SHORT) == 2
        await asyncio.sleep(PAST_SHORT)
        assert await cache.record_violation("192.0.2.1", SHORT) == 1

    async def test_block_is_returned_until_it_expires(self, cache: CacheBackend) -> None:
        now = time.time()
        block = IpBlock(ip="2001:db8::1", reason="too many 401", expires_at=now + SHORT, created_at=now)
        await cache.block_ip(block)
        got = await cache.get_block("2001:db8::1")
        assert got is not None
        assert (got.ip, got.reason) == ("2001:db8::1", "too many 401")
        assert got.expires_at == pytest.approx(block.expires_at, abs=0.01)
        assert got.created_at == pytest.approx(block.created_at, abs=0.01)
        assert await cache.get_block("2001:db8::2") is None
        await asyncio.sleep(PAST_SHORT)
        assert await cache.get_block("2001:db8::1") is None
        assert await cache.list_blocks() == []

    async def test_block_already_expired_is_never_returned(self, cache: CacheBackend) -> None:
        now = time.time()
        await cache.block_ip(IpBlock("192.0.2.9", "old", expires_at=now - 1, created_at=now - 100))
        assert await cache.get_block("192.0.2.9") is None
        assert await cache.list_blocks() == []

    async def test_block_replaces_previous_block(self, cache: CacheBackend) -> None:
        now = time.time()
        await cache.block_ip(IpBlock("192.0.2.1", "first", expires_at=now + 60, created_at=now))
        await cache.block_ip(IpBlock("192.0.2.1", "second", expires_at=now + 120, created_at=now))
        got = await cache.get_block("192.0.2.1")
        assert got is not None and got.reason == "second"
        assert got.expires_at == pytest.approx(now + 120, abs=0.01)
        assert [b.reason for b in await cache.list_blocks()] == ["second"]

    async def test_list_and_unblock(self, cache: CacheBackend) -> None:
        now = time.time()
        await cache.block_ip(IpBlock("192.0.2.1", "a", expires_at=now + 60, created_at=now))
        await cache.block_ip(IpBlock("192.0.2.2", "b", expires_at=now + 60, created_at=now))
        await cache.block_ip(IpBlock("192.0.2.3", "c", expires_at=now + 0.2, created_at=now))
        await asyncio.sleep(0.4)
        assert sorted(b.ip for b in await cache.list_blocks()) == ["192.0.2.1", "192.0.2.2"]
        assert await cache.unblock_ip("192.0.2.1") is True
        assert await cache.unblock_ip("192.0.2.1") is False
        assert await cache.unblock_ip("192.0.2.77") is False
        assert await cache.get_block("192.0.2.1") is None
        assert [b.ip for b in await cache.list_blocks()] == ["192.0.2.2"]

    async def test_unblock_forgets_violations(self, cache: CacheBackend) -> None:
        for _ in range(5):
            await cache.record_violation("192.0.2.5", 60)
        now = time.time()
        await cache.block_ip(IpBlock("192.0.2.5", "x", expires_at=now + 60, created_at=now))
        assert await cache.unblock_ip("192.0.2.5") is True
        assert await cache.record_violation("192.0.2.5", 60) == 1

    # --- banner -----------------------------------------------------------------------------------

    async def test_banner_set_and_clear(self, cache: CacheBackend) -> None:
        assert await cache.get_banner() is None
        await cache.set_banner(Banner("Maintenance at 18:00 UTC — «read-only»", level="warning"))
        assert await cache.get_banner() == Banner("Maintenance at 18:00 UTC — «read-only»", level="warning")
        await cache.set_banner(Banner("back to normal"))
        assert await cache.get_banner() == Banner("back to normal", level="info")
        await cache.set_banner(None)
        assert await cache.get_banner() is None

    # --- leases -----------------------------------------------------------------------------------

    async def test_lease_is_exclusive_under_contention(self, cache: CacheBackend) -> None:
        await _open_many_connections(cache)
        owners = [f"replica-{i}" for i in range(50)]
        taken = await asyncio.gather(*(cache.acquire_lease("fetch:lodash", o, 30) for o in owners))
        assert taken.count(True) == 1
        winner = owners[taken.index(True)]
        assert not await cache.acquire_lease("fetch:lodash", "latecomer", 30)
        assert await cache.release_lease("fetch:lodash", winner)
        assert await cache.acquire_lease("fetch:lodash", "latecomer", 30)

    async def test_lease_holder_may_acquire_again(self, cache: CacheBackend) -> None:
        assert await cache.acquire_lease("warm", "a", 30)
        assert await cache.acquire_lease("warm", "a", 30)
        assert not await cache.acquire_lease("warm", "b", 30)

    async def test_release_only_by_owner(self, cache: CacheBackend) -> None:
        assert await cache.acquire_lease("k", "owner", 30)
        assert await cache.release_lease("k", "intruder") is False
        assert not await cache.acquire_lease("k", "intruder", 30)
        assert await cache.release_lease("k", "owner") is True
        assert await cache.release_lease("k", "owner") is False
        assert await cache.release_lease("never-taken", "owner") is False

    async def test_extend_only_by_owner(self, cache: CacheBackend) -> None:
        assert await cache.acquire_lease("k", "owner", SHORT)
        assert await cache.extend_lease("k", "intruder", 30) is False
        assert await cache.extend_lease("k", "owner", 30) is True
        await asyncio.sleep(PAST_SHORT)
        # Extended: still held well past its original TTL.
        assert not await cache.acquire_lease("k", "intruder", 30)
        assert await cache.extend_lease("never-taken", "owner", 30) is False

    async def test_lease_lapses_after_ttl(self, cache: CacheBackend) -> None:
        assert await cache.acquire_lease("k", "crashed", SHORT)
        assert not await cache.acquire_lease("k", "other", 30)
        await asyncio.sleep(PAST_SHORT)
        assert await cache.extend_lease("k", "crashed", 30) is False
        assert await cache.acquire_lease("k", "other", 30)
        assert await cache.release_lease("k", "crashed") is False
        assert await cache.release_lease("k", "other") is True

    # --- shared between replicas ------------------------------------------------------------------

    async def test_peer_sees_metadata_and_invalidation(self, cache: CacheBackend, cache_peer: CacheBackend) -> None:
        await cache.set("doc", b"from replica one", ttl_secs=60)
        assert await cache_peer.get("doc") == b"from replica one"
        await cache_peer.invalidate("doc")
        assert await cache.get_stale("doc") is None

    async def test_peer_shares_counters(self, cache: CacheBackend, cache_peer: CacheBackend) -> None:
        counts = await asyncio.gather(*(backend.incr_window("shared", 60) for backend in [cache, cache_peer] * 50))
        assert sorted(c.count for c in counts) == list(range(1, 101))
        assert await cache.record_violation("192.0.2.1", 60) == 1
        assert await cache_peer.record_violation("192.0.2.1", 60) == 2

    async def test_peer_sees_blocks(self, cache: CacheBackend, cache_peer: CacheBackend) -> None:
        now = time.time()
        await cache.block_ip(IpBlock("192.0.2.1", "abuse", expires_at=now + 60, created_at=now))
        got = await cache_peer.get_block("192.0.2.1")
        assert got is not None and got.reason == "abuse"
        assert [b.ip for b in await cache_peer.list_blocks()] == ["192.0.2.1"]
        assert await cache_peer.unblock_ip("192.0.2.1") is True
        assert await cache.get_block("192.0.2.1") is None

    async def test_peer_sees_banner(self, cache: CacheBackend, cache_peer: CacheBackend) -> None:
        await cache.set_banner(Banner("read-only until noon", level="warning"))
        assert await cache_peer.get_banner() == Banner("read-only until noon", level="warning")
        await cache_peer.set_banner(None)
        assert await cache.get_banner() is None

    async def test_peer_respects_leases(self, cache: CacheBackend, cache_peer: CacheBackend) -> None:
        assert await cache.acquire_lease("warm:react", "replica-1", 30)
        assert not await cache_peer.acquire_lease("warm:react", "replica-2", 30)
        assert await cache_peer.release_lease("warm:react", "replica-2") is False
        assert await cache_peer.release_lease("warm:react", "replica-1") is True
        assert await cache_peer.acquire_lease("warm:react", "replica-2", 30)
        assert not await cache.acquire_lease("warm:react", "replica-1", 30)
