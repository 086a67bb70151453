"""The contract every `StorageBackend` must keep, as a reusable pytest class.

A backend's test module subclasses `StorageBackendContract` and provides two fixtures, and gets
the whole suite run against a real instance of its service::

    from batlehub.testing.storage_contract import StorageBackendContract, storage_type_named

    class TestMyBackend(StorageBackendContract):
        @pytest.fixture
        def storage_type(self):
            return storage_type_named("mine")      # found through the installed plugins

        @pytest.fixture
        def storage_config(self, tmp_path):
            return {"bucket": ..., "prefix": f"test-{uuid4().hex}/"}   # a fresh namespace per test

The contract's `storage` fixture builds the backend exactly as the server does: `storage_config`
validated by the descriptor's `config_model` (through `batlehub.app.validate_config`), the
factory called with the validated model; then it opens it, yields it and closes it. The suite
also checks that the model refuses keys it does not declare.

Rules the suite pins down (where the `StorageBackend` Protocol leaves room):

* Ranges are `[start, end)` byte offsets. `start=None` means 0, `end=None` means the size; an `end`
  past the size is clamped to it. An empty range (`start >= end`, or `start >= size`) yields no
  bytes and is not an error — but a missing object still raises `NotFound`. Negative offsets
  raise `ValueError`.
* `get` of a missing object raises `NotFound` before yielding anything; invalid keys raise
  `InvalidKey` (either when `get` is called or on first iteration).
* Keys are never decoded: `%2e%2e` is three literal characters, never `..`.
* A refused put (size limit, digest mismatch, a failing or cancelled source) leaves the key as it
  was: absent if it was absent, the old bytes if it held an object.
* `list(prefix)` is a plain string-prefix match on keys, in no particular order.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from batlehub.app import validate_config
from batlehub.config import Settings
from batlehub.errors import ConfigError, IntegrityError, InvalidKey, NotFound, PayloadTooLarge
from batlehub.interfaces import BlobStat, StorageBackend, StorageBackendType
from batlehub.plugins import flatten, get_plugin_manager

KNOWN_CAPABILITIES = frozenset({"local_path", "presigned_url"})

INVALID_KEYS = [
    "",
    "..",
    ".",
    "../x",
    "a/../../x",
    "a/..",
    "./a",
    "a/./b",
    "/abs",
    "/etc/passwd",
    "a\\b",
    "..\\x",
    "a\x00b",
    "a\nb",
    "a//b",
    "a/",
]
"""Keys that could escape a namespace (or be read two ways); every operation must refuse them."""

LITERAL_KEYS = ["%2e%2e/x", "a/%2e%2e/%2e%2e/x", "%2F%2e%2e%2Fx", "..%2fx", "%00"]
"""Percent-encoded look-alikes: valid keys, stored under exactly these names, never decoded."""


def storage_type_named(name: str) -> StorageBackendType:
    """The descriptor an installed plugin registers under `name`, found the way the server finds
    it (built-ins plus `batlehub` entry points), so the test also proves the plugin is wired up."""
    pm = get_plugin_manager()
    for descriptor in flatten(pm.hook.register_storage_backends()):
        if descriptor.name == name:
            return descriptor
    raise LookupError(f"no storage backend named {name!r} is installed")


async def chunked(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    """`data` as an async stream of `size`-byte chunks (yielding to the loop between them)."""
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await asyncio.sleep(0)


async def generated(total: int, seed: int, chunk: int = 256 * 1024) -> AsyncIterator[bytes]:
    """`total` pseudo-random bytes, produced chunk by chunk so the whole object is never in memory."""
    rng = random.Random(seed)
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield rng.randbytes(n)
        sent += n


def generated_digest(total: int, seed: int, chunk: int = 256 * 1024) -> str:
    """sha256 of what `generated(total, seed, chunk)` yields."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        h.update(rng.randbytes(n))
        sent += n
    return h.hexdigest()


async def read_all(storage: StorageBackend, key: str, start: int | None = None, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in storage.get(key, start, end)])


async def keys_of(listing: AsyncIterable[BlobStat]) -> dict[str, BlobStat]:
    return {stat.key: stat async for stat in listing}


def _digests(data: bytes) -> dict[str, str]:
    return {
        "sha512": hashlib.sha512(data).hexdigest(),
        "sha256": hashlib.sha256(data).hexdigest(),
        "sha1": hashlib.sha1(data).hexdigest(),
    }


class StorageBackendContract:
    """Subclass me (name the subclass `Test...`) and provide `storage_type` and `storage_config`."""

    # --- fixtures a subclass provides ---------------------------------------------------------------

    @pytest.fixture
    def storage_type(self) -> StorageBackendType:
        """The backend's descriptor, usually `storage_type_named("<name>")`."""
        raise NotImplementedError("subclasses provide the storage_type fixture")

    @pytest.fixture
    def storage_config(self) -> Mapping[str, Any]:
        """The `[storage]` section (without `type`), pointing at a namespace no other test uses."""
        raise NotImplementedError("subclasses provide the storage_config fixture")

    # --- the backend under test ---------------------------------------------------------------------

    @pytest.fixture
    async def storage(
        self, storage_type: StorageBackendType, storage_config: Mapping[str, Any], tmp_path: Path
    ) -> AsyncIterator[StorageBackend]:
        settings = Settings(data_dir=tmp_path / "data")
        config = validate_config(
            storage_type, {"type": storage_type.name, **storage_config}, path="storage", settings=settings
        )
        backend = storage_type.factory(config, settings)
        await backend.open()
        try:
            yield backend
        finally:
            await backend.close()

    # --- the descriptor -----------------------------------------------------------------------------

    def test_descriptor_is_frozen_and_complete(self, storage_type: StorageBackendType) -> None:
        assert storage_type.name and storage_type.description
        assert storage_type.capabilities <= KNOWN_CAPABILITIES, storage_type.capabilities
        with pytest.raises(FrozenInstanceError):
            storage_type.name = "changed"  # type: ignore[misc]

    def test_config_model_accepts_the_known_keys(
        self, storage_type: StorageBackendType, storage_config: Mapping[str, Any], tmp_path: Path
    ) -> None:
        assert issubclass(storage_type.config_model, BaseModel)
        config = validate_config(storage_type, storage_config, path="storage", settings=Settings(data_dir=tmp_path))
        assert isinstance(config, storage_type.config_model)
        if storage_config:  # validated configs are immutable, like the core's settings
            with pytest.raises(ValidationError):
                setattr(config, next(iter(storage_config)), None)

    def test_config_model_refuses_unknown_keys(
        self, storage_type: StorageBackendType, storage_config: Mapping[str, Any], tmp_path: Path
    ) -> None:
        with pytest.raises(ConfigError) as info:
            validate_config(
                storage_type, {**storage_config, "no_such_key": 1}, path="storage", settings=Settings(data_dir=tmp_path)
            )
        (problem,) = info.value.problems
        assert problem.startswith(f"storage.no_such_key: unknown key for type {storage_type.name!r} (known: "), problem
        for key in storage_config:  # the message lists the keys the operator could have meant
            assert key in problem, problem

    async def test_backend_satisfies_protocol(self, storage: StorageBackend) -> None:
        assert isinstance(storage, StorageBackend)
        await storage.ping()

    async def test_namespace_starts_empty(self, storage: StorageBackend) -> None:
        assert await keys_of(storage.list()) == {}

    # --- put / get ----------------------------------------------------------------------------------

    async def test_put_get_roundtrip_reports_size_and_digests(self, storage: StorageBackend) -> None:
        data = random.Random(1).randbytes(300_001)
        blob = await storage.put("pkg/a-1.0.0.tgz", chunked(data, 7_001))
        assert blob.key == "pkg/a-1.0.0.tgz"
        assert blob.size == len(data)
        assert {"sha512": blob.sha512, "sha256": blob.sha256, "sha1": blob.sha1} == _digests(data)
        assert await read_all(storage, "pkg/a-1.0.0.tgz") == data

    async def test_empty_object(self, storage: StorageBackend) -> None:
        blob = await storage.put("empty", chunked(b""))
        assert blob.size == 0
        assert blob.sha256 == hashlib.sha256(b"").hexdigest()
        assert await read_all(storage, "empty") == b""
        stat = await storage.stat("empty")
        assert stat is not None and stat.size == 0

    async def test_stat(self, storage: StorageBackend) -> None:
        assert await storage.stat("s/x") is None
        before = time.time()
        await storage.put("s/x", chunked(b"12345"))
        stat = await storage.stat("s/x")
        assert stat is not None
        assert stat.key == "s/x"
        assert stat.size == 5
        # Servers round to whole seconds and clocks differ a little: allow some slack.
        assert before - 5 <= stat.modified <= time.time() + 5

    async def test_overwrite_replaces_bytes_and_size(self, storage: StorageBackend) -> None:
        await storage.put("o/key", chunked(b"first version, longer"))
        blob = await storage.put("o/key", chunked(b"second"))
        assert blob.size == 6
        assert await read_all(storage, "o/key") == b"second"
        stat = await storage.stat("o/key")
        assert stat is not None and stat.size == 6
        assert list(await keys_of(storage.list("o/"))) == ["o/key"]

    async def test_large_streamed_object(self, storage: StorageBackend) -> None:
        total, seed = 20 * 1024 * 1024 + 12_345, 20
        blob = await storage.put("big/blob", generated(total, seed))
        want = generated_digest(total, seed)
        assert blob.size == total
        assert blob.sha256 == want
        got = hashlib.sha256()
        size = 0
        async for chunk in storage.get("big/blob"):
            got.update(chunk)
            size += len(chunk)
        assert size == total
        assert got.hexdigest() == want

    # --- delete / missing ---------------------------------------------------------------------------

    async def test_delete(self, storage: StorageBackend) -> None:
        await storage.put("d/x", chunked(b"bye"))
        assert await storage.delete("d/x") is True
        assert await storage.stat("d/x") is None
        assert await storage.delete("d/x") is False
        with pytest.raises(NotFound):
            await read_all(storage, "d/x")
        assert await keys_of(storage.list()) == {}

    async def test_get_missing_raises_not_found_before_yielding(self, storage: StorageBackend) -> None:
        received: list[bytes] = []
        with pytest.raises(NotFound):
            async for chunk in storage.get("no/such/object"):
                received.append(chunk)
        assert received == []
        with pytest.raises(NotFound):
            await read_all(storage, "no/such/object", 0, 0)  # an empty range still needs the object

    # --- list ---------------------------------------------------------------------------------------

    async def test_list_by_prefix(self, storage: StorageBackend) -> None:
        for key, data in {"p1/a": b"a", "p1/b/c": b"bc", "p1x/d": b"ddd", "p2/e": b"eeee"}.items():
            await storage.put(key, chunked(data))
        under_p1 = await keys_of(storage.list("p1/"))
        assert set(under_p1) == {"p1/a", "p1/b/c"}
        assert under_p1["p1/b/c"].size == 2
        assert set(await keys_of(storage.list("p1"))) == {"p1/a", "p1/b/c", "p1x/d"}
        assert set(await keys_of(storage.list("p1/b"))) == {"p1/b/c"}
        assert set(await keys_of(storage.list("p2/"))) == {"p2/e"}
        assert set(await keys_of(storage.list())) == {"p1/a", "p1/b/c", "p1x/d", "p2/e"}
        assert await keys_of(storage.list("p3/")) == {}

    async def test_list_refuses_escaping_prefix(self, storage: StorageBackend) -> None:
        for prefix in ("../", "/abs", "a/../..", "a\\b"):
            with pytest.raises(InvalidKey):
                await keys_of(storage.list(prefix))

    # --- ranges -------------------------------------------------------------------------------------

    async def test_ranges(self, storage: StorageBackend) -> None:
        data = bytes(range(256)) * 40
        await storage.put("r/x", chunked(data, 1000))
        assert await read_all(storage, "r/x", 100) == data[100:]
        assert await read_all(storage, "r/x", 100, 356) == data[100:356]
        assert await read_all(storage, "r/x", None, 10) == data[:10]
        assert await read_all(storage, "r/x", 0, 1) == data[:1]
        assert await read_all(storage, "r/x", len(data) - 1) == data[-1:]
        assert await read_all(storage, "r/x", 10_000, 20_000) == data[10_000:]  # end clamped

    async def test_empty_ranges_yield_nothing(self, storage: StorageBackend) -> None:
        data = b"0123456789"
        await storage.put("r/empty", chunked(data))
        assert await read_all(storage, "r/empty", 5, 5) == b""
        assert await read_all(storage, "r/empty", 7, 3) == b""
        assert await read_all(storage, "r/empty", 10) == b""
        assert await read_all(storage, "r/empty", 50, 60) == b""

    async def test_negative_range_is_refused(self, storage: StorageBackend) -> None:
        await storage.put("r/neg", chunked(b"abc"))
        with pytest.raises(ValueError):
            await read_all(storage, "r/neg", -1)

    async def test_range_across_chunk_boundaries(self, storage: StorageBackend) -> None:
        total, seed = 3 * 1024 * 1024 + 17, 3
        data = b"".join([chunk async for chunk in generated(total, seed)])
        await storage.put("r/big", chunked(data, 300_000))
        start, end = 1024 * 1024 - 10, 2 * 1024 * 1024 + 10
        assert await read_all(storage, "r/big", start, end) == data[start:end]

    # --- refusals leave nothing behind ----------------------------------------------------------------

    async def test_max_size_refusal_stores_nothing(self, storage: StorageBackend) -> None:
        with pytest.raises(PayloadTooLarge):
            await storage.put("m/x", chunked(b"x" * 1001, 100), max_size=1000)
        assert await storage.stat("m/x") is None
        assert await keys_of(storage.list()) == {}
        blob = await storage.put("m/y", chunked(b"y" * 1000, 100), max_size=1000)
        assert blob.size == 1000

    async def test_max_size_is_enforced_while_reading(self, storage: StorageBackend) -> None:
        """An endless source must be cut off at the limit, not read to its (never) end."""
        consumed = 0

        async def endless() -> AsyncIterator[bytes]:
            nonlocal consumed
            while True:
                consumed += 65536
                yield b"z" * 65536

        with pytest.raises(PayloadTooLarge):
            await asyncio.wait_for(storage.put("m/endless", endless(), max_size=1_000_000), timeout=30)
        assert consumed < 2_000_000
        assert await storage.stat("m/endless") is None

    async def test_refused_overwrite_keeps_old_object(self, storage: StorageBackend) -> None:
        await storage.put("m/keep", chunked(b"original"))
        with pytest.raises(PayloadTooLarge):
            await storage.put("m/keep", chunked(b"n" * 100), max_size=10)
        with pytest.raises(IntegrityError):
            await storage.put("m/keep", chunked(b"other"), expected={"sha1": "0" * 40})
        assert await read_all(storage, "m/keep") == b"original"

    async def test_expected_digest_match_and_mismatch(self, storage: StorageBackend) -> None:
        data = b"integrity matters"
        good = _digests(data)
        blob = await storage.put("i/good", chunked(data), expected={"sha512": good["sha512"].upper()})
        assert blob.sha512 == good["sha512"]
        with pytest.raises(IntegrityError):
            await storage.put("i/bad", chunked(data), expected={"sha512": good["sha512"], "sha1": "f" * 40})
        assert await storage.stat("i/bad") is None
        assert set(await keys_of(storage.list())) == {"i/good"}

    async def test_failing_source_stores_nothing(self, storage: StorageBackend) -> None:
        async def broken() -> AsyncIterator[bytes]:
            yield b"a" * 100_000
            raise ConnectionResetError("client went away")

        with pytest.raises(ConnectionResetError):
            await storage.put("f/x", broken())
        assert await storage.stat("f/x") is None
        assert await keys_of(storage.list()) == {}

    async def test_cancelled_put_stores_nothing(self, storage: StorageBackend) -> None:
        started = asyncio.Event()

        async def stalled() -> AsyncIterator[bytes]:
            yield b"b" * 200_000
            started.set()
            await asyncio.Event().wait()
            yield b""  # never reached

        task = asyncio.create_task(storage.put("c/x", stalled()))
        await asyncio.wait_for(started.wait(), timeout=30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await storage.stat("c/x") is None
        assert await keys_of(storage.list()) == {}

    # --- keys -----------------------------------------------------------------------------------------

    @pytest.mark.parametrize("key", INVALID_KEYS, ids=repr)
    async def test_invalid_keys_are_refused_everywhere(self, storage: StorageBackend, key: str) -> None:
        with pytest.raises(InvalidKey):
            await storage.put(key, chunked(b"evil"))
        with pytest.raises(InvalidKey):
            await read_all(storage, key)
        with pytest.raises(InvalidKey):
            await storage.stat(key)
        with pytest.raises(InvalidKey):
            await storage.delete(key)
        assert await keys_of(storage.list()) == {}

    async def test_percent_encoded_keys_are_literal_names(self, storage: StorageBackend) -> None:
        for i, key in enumerate(LITERAL_KEYS):
            await storage.put(key, chunked(f"literal {i}".encode()))
        assert set(await keys_of(storage.list())) == set(LITERAL_KEYS)
        for i, key in enumerate(LITERAL_KEYS):
            assert await read_all(storage, key) == f"literal {i}".encode()
        # What decoding would have produced does not exist.
        assert await storage.stat("x") is None
        assert await storage.stat("a/x") is None
        path = storage.local_path("%2e%2e/x")
        if path is not None:
            assert path.name == "x" and path.parent.name == "%2e%2e"
            assert path.read_bytes() == b"literal 0"

    # --- concurrency ----------------------------------------------------------------------------------

    async def test_concurrent_puts_of_different_keys(self, storage: StorageBackend) -> None:
        payloads = {f"cc/{i:02d}/pkg.tgz": random.Random(i).randbytes(50_000 + i * 997) for i in range(16)}
        blobs = await asyncio.gather(*(storage.put(k, chunked(v, 4096)) for k, v in payloads.items()))
        for blob in blobs:
            assert blob.sha256 == hashlib.sha256(payloads[blob.key]).hexdigest()
        listed = await keys_of(storage.list("cc/"))
        assert {k: s.size for k, s in listed.items()} == {k: len(v) for k, v in payloads.items()}
        for key, data in payloads.items():
            assert await read_all(storage, key) == data

    async def test_concurrent_overwrites_leave_one_whole_version(self, storage: StorageBackend) -> None:
        versions = [bytes([i]) * (100_000 + i) for i in range(6)]
        await asyncio.gather(*(storage.put("race/key", chunked(v, 8192)) for v in versions))
        assert await read_all(storage, "race/key") in versions

    # --- optional capabilities --------------------------------------------------------------------------

    async def test_local_path_matches_capability(
        self, storage: StorageBackend, storage_type: StorageBackendType
    ) -> None:
        data = b"served by sendfile"
        await storage.put("lp/file", chunked(data))
        path = storage.local_path("lp/file")
        if "local_path" in storage_type.capabilities:
            assert path is not None and path.is_file()
            assert path.read_bytes() == data
            assert storage.local_path("lp/missing") is None
        else:
            assert path is None

    async def test_presigned_url_matches_capability(
        self, storage: StorageBackend, storage_type: StorageBackendType
    ) -> None:
        await storage.put("ps/file", chunked(b"x"))
        url = await storage.presigned_url("ps/file", 60)
        if "presigned_url" in storage_type.capabilities:
            assert url is None or url.startswith(("http://", "https://"))
        else:
            assert url is None
