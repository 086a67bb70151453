"""The `s3` storage backend against a real S3 server (SeaweedFS, from the `seaweedfs` and
`s3_config` fixtures of `batlehub.testing`): the shared storage contract, then what only S3 can
get wrong — multipart uploads and their clean-up, bounded memory, presigned downloads, and
turning an unreachable service into "storage unavailable"."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import socket
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from batlehub_storage_s3 import S3Options, S3Storage

from batlehub.app import validate_config
from batlehub.config import Settings
from batlehub.errors import ConfigError, IntegrityError, NotFound, PayloadTooLarge, ServiceUnavailable, UpstreamError
from batlehub.interfaces import StorageBackendType
from batlehub.testing.storage_contract import (
    StorageBackendContract,
    chunked,
    generated,
    generated_digest,
    keys_of,
    read_all,
    storage_type_named,
)

MiB = 1024 * 1024


def fresh_prefix() -> str:
    return f"test-{uuid.uuid4().hex}/"


class TestS3Contract(StorageBackendContract):
    @pytest.fixture
    def storage_type(self) -> StorageBackendType:
        return storage_type_named("s3")

    @pytest.fixture
    def storage_config(self, s3_config: dict[str, Any]) -> dict[str, Any]:
        return {**s3_config, "prefix": fresh_prefix()}


# --- helpers ----------------------------------------------------------------------------------------


def build(section: dict[str, Any], settings: Settings) -> S3Storage:
    """The backend as the server builds it: the section validated by the model, then the factory."""
    descriptor = storage_type_named("s3")
    backend = descriptor.factory(validate_config(descriptor, section, path="storage", settings=settings), settings)
    assert isinstance(backend, S3Storage)
    return backend


def s3_options(section: dict[str, Any]) -> S3Options:
    options = validate_config(storage_type_named("s3"), section, path="storage")
    assert isinstance(options, S3Options)
    return options


@pytest.fixture
async def make_s3(s3_config: dict[str, Any], tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Build and open S3 backends with overrides of `s3_config` (fresh prefix unless given)."""
    opened: list[S3Storage] = []

    async def make(**overrides: Any) -> S3Storage:
        section = {"type": "s3", **s3_config, "prefix": fresh_prefix(), **overrides}
        backend = build(section, Settings(data_dir=tmp_path))
        assert isinstance(backend, S3Storage)
        await backend.open()
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        await backend.close()


async def pending_uploads(storage: S3Storage) -> list[str]:
    response = await storage._client.list_multipart_uploads(
        Bucket=storage.options.bucket, Prefix=storage.options.prefix
    )
    return [u["Key"] for u in response.get("Uploads", [])]


async def etag(storage: S3Storage, key: str) -> str:
    head = await storage._client.head_object(Bucket=storage.options.bucket, Key=storage.options.prefix + key)
    return str(head["ETag"]).strip('"')


# --- descriptor and configuration -------------------------------------------------------------------


def test_descriptor() -> None:
    descriptor = storage_type_named("s3")
    assert descriptor.shared is True
    assert descriptor.capabilities == frozenset({"presigned_url"})
    assert descriptor.config_model is S3Options
    assert {"bucket", "endpoint", "prefix", "redirect_downloads", "part_size"} <= set(S3Options.model_fields)


def test_config_defaults_and_normalisation() -> None:
    options = s3_options({"type": "s3", "bucket": "b", "prefix": "/hub/artifacts/", "endpoint": "http://s3:9000/"})
    assert options.region == "us-east-1"
    assert options.prefix == "hub/artifacts/"
    assert options.endpoint == "http://s3:9000"
    assert options.part_size == 8 * MiB
    assert options.redirect_downloads is False
    assert options.access_key_id is None  # the AWS credential chain
    assert s3_options({"bucket": "b"}).prefix == ""
    # Empty values, as an unset environment variable gives them, mean "not set".
    unset = s3_options({"bucket": "b", "region": "", "endpoint": "", "access_key_id": "", "secret_access_key": ""})
    assert (unset.region, unset.endpoint, unset.access_key_id) == ("us-east-1", None, None)


def test_config_problems_name_their_keys() -> None:
    with pytest.raises(ConfigError) as info:
        s3_options(
            {
                "type": "s3",
                "access_key_id": "only-one",
                "part_size": 1024,
                "force_path_style": "yes",
                "endpoint": "s3.local",
                "prefix": "../escape",
                "buckt": "typo",
            }
        )
    assert sorted(info.value.problems) == [
        "storage.bucket: required",
        "storage.buckt: unknown key for type 's3' (known: access_key_id, bucket, endpoint, force_path_style,"
        " multipart_threshold_bytes, part_size, prefix, redirect_downloads, region, secret_access_key, type)",
        "storage.endpoint: expected an http:// or https:// URL, got 's3.local'",
        "storage.force_path_style: expected true or false, got 'yes'",
        "storage.part_size: must be between 5242880 and 5368709120 bytes, got 1024",
        "storage.prefix: '../escape' is not a safe relative key prefix",
        "storage.secret_access_key: set both access_key_id and secret_access_key, or neither"
        " (to use the AWS credential chain)",
    ]


# --- multipart --------------------------------------------------------------------------------------


async def test_small_object_is_one_put_large_object_is_multipart(make_s3: Callable[..., Any]) -> None:
    storage = await make_s3(part_size=5 * MiB, multipart_threshold_bytes=5 * MiB)
    await storage.put("small", chunked(b"s" * (5 * MiB)))
    total = 12 * MiB + 7
    blob = await storage.put("large", generated(total, 7))
    assert blob.size == total and blob.sha256 == generated_digest(total, 7)
    assert "-" not in await etag(storage, "small")
    # A multipart object's ETag is "<md5 of the part md5s>-<number of parts>".
    assert (await etag(storage, "large")).endswith("-3")
    assert await pending_uploads(storage) == []
    got = hashlib.sha256()
    async for chunk in storage.get("large"):
        got.update(chunk)
    assert got.hexdigest() == blob.sha256


async def test_multipart_integrity_mismatch_aborts_upload(make_s3: Callable[..., Any]) -> None:
    storage = await make_s3(part_size=5 * MiB, multipart_threshold_bytes=5 * MiB)
    with pytest.raises(IntegrityError):
        await storage.put("bad", generated(11 * MiB, 1), expected={"sha256": "0" * 64})
    assert await storage.stat("bad") is None
    assert await pending_uploads(storage) == []


async def test_multipart_size_limit_aborts_upload(make_s3: Callable[..., Any]) -> None:
    storage = await make_s3(part_size=5 * MiB, multipart_threshold_bytes=5 * MiB)
    with pytest.raises(PayloadTooLarge):
        await storage.put("huge", generated(30 * MiB, 2), max_size=12 * MiB)
    assert await storage.stat("huge") is None
    assert await pending_uploads(storage) == []


async def test_multipart_broken_source_and_cancel_abort_upload(make_s3: Callable[..., Any]) -> None:
    storage = await make_s3(part_size=5 * MiB, multipart_threshold_bytes=5 * MiB)

    async def broken() -> AsyncIterator[bytes]:
        async for chunk in generated(11 * MiB, 3):
            yield chunk
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await storage.put("broken", broken())

    parts_sent = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        async for chunk in generated(11 * MiB, 4):
            yield chunk
        parts_sent.set()
        await asyncio.Event().wait()
        yield b""

    task = asyncio.create_task(storage.put("stalled", stalled()))
    await asyncio.wait_for(parts_sent.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await pending_uploads(storage) == []
    assert await keys_of(storage.list()) == {}


async def test_memory_stays_bounded_for_a_100_mb_upload(make_s3: Callable[..., Any]) -> None:
    """Python-level allocations during a 100 MB streamed upload stay under three part sizes."""
    part_size = 8 * MiB
    storage = await make_s3(part_size=part_size, multipart_threshold_bytes=part_size)
    total = 100 * MiB
    gc.collect()
    rss_before = _reset_peak_rss()
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        blob = await storage.put("hundred", generated(total, 100, chunk=64 * 1024))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_peak = _peak_rss()
    growth = peak - baseline
    print(
        f"\n100 MB upload, part_size {part_size // MiB} MiB: tracemalloc peak growth {growth / MiB:.1f} MiB; "
        f"RSS {rss_before / MiB:.0f} MiB before, peak {rss_peak / MiB:.0f} MiB (+{(rss_peak - rss_before) / MiB:.0f})"
    )
    assert blob.size == total
    assert blob.sha256 == generated_digest(total, 100, chunk=64 * 1024)
    assert growth < 3 * part_size, f"upload held {growth / MiB:.1f} MiB at its peak"
    stat = await storage.stat("hundred")
    assert stat is not None and stat.size == total
    assert (await etag(storage, "hundred")).endswith(f"-{-(-total // part_size)}")


def _reset_peak_rss() -> int:
    """Current RSS, after resetting the kernel's peak-RSS mark (Linux: `5` to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# --- prefixes ---------------------------------------------------------------------------------------


async def test_prefixes_isolate_namespaces_in_one_bucket(make_s3: Callable[..., Any]) -> None:
    one = await make_s3(prefix="iso-" + uuid.uuid4().hex)
    two = await make_s3(prefix="iso-" + uuid.uuid4().hex)
    await one.put("pkg/x", chunked(b"one"))
    assert await two.stat("pkg/x") is None
    assert await keys_of(two.list()) == {}
    assert set(await keys_of(one.list())) == {"pkg/x"}
    head = await one._client.head_object(Bucket=one.options.bucket, Key=one.options.prefix + "pkg/x")
    assert head["ContentLength"] == 3


# --- presigned downloads ----------------------------------------------------------------------------


async def test_presigned_url_serves_the_object_when_redirects_are_on(make_s3: Callable[..., Any]) -> None:
    storage = await make_s3(redirect_downloads=True)
    data = b"straight from S3" * 1000
    await storage.put("pkg/a.tgz", chunked(data))
    url = await storage.presigned_url("pkg/a.tgz", 120)
    assert url is not None
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            assert response.status == 200
            assert await response.read() == data
        # The signature covers the key: another key with the same query string is refused.
        async with http.get(url.replace("a.tgz", "b.tgz")) as response:
            assert response.status == 403


async def test_presigned_url_expires(make_s3: Callable[..., Any]) -> None:
    storage = await make_s3(redirect_downloads=True)
    await storage.put("pkg/short", chunked(b"x"))
    url = await storage.presigned_url("pkg/short", 1)
    assert url is not None
    await asyncio.sleep(2.5)
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            assert response.status == 403


async def test_presigned_url_is_none_without_redirects(make_s3: Callable[..., Any]) -> None:
    storage = await make_s3(redirect_downloads=False)
    await storage.put("pkg/a.tgz", chunked(b"x"))
    assert await storage.presigned_url("pkg/a.tgz") is None


# --- failures ---------------------------------------------------------------------------------------


async def test_closed_port_is_service_unavailable(make_s3: Callable[..., Any]) -> None:
    # A bound socket that never listens: connections are refused, and no other process can take
    # the port meanwhile (a port that is merely free may be someone's by the time we connect).
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        storage = await make_s3(endpoint=f"http://127.0.0.1:{closed.getsockname()[1]}")
        with pytest.raises(ServiceUnavailable, match="storage unavailable"):
            await storage.ping()
        with pytest.raises(ServiceUnavailable):
            await storage.put("x", chunked(b"data"))
        with pytest.raises(ServiceUnavailable):
            await read_all(storage, "x")
        with pytest.raises(ServiceUnavailable):
            await storage.stat("x")
        with pytest.raises(ServiceUnavailable):
            await keys_of(storage.list())
        with pytest.raises(ServiceUnavailable):
            await storage.delete("x")


async def test_server_down_then_back(make_s3: Callable[..., Any], seaweedfs: Any) -> None:
    storage = await make_s3()
    await storage.put("survivor", chunked(b"still here"))
    await asyncio.to_thread(seaweedfs.stop)
    with pytest.raises(ServiceUnavailable):
        await storage.ping()
    with pytest.raises(ServiceUnavailable):
        await read_all(storage, "survivor")
    await asyncio.to_thread(seaweedfs.start)
    await storage.ping()  # the same open backend recovers: no restart of the hub needed
    assert await read_all(storage, "survivor") == b"still here"


async def test_missing_bucket_names_the_setting(make_s3: Callable[..., Any]) -> None:
    storage = await make_s3(bucket="no-such-bucket-" + uuid.uuid4().hex[:12])
    with pytest.raises(ServiceUnavailable, match=r"storage\.bucket"):
        await storage.ping()
    # (Not `put`: SeaweedFS creates a missing bucket on first write, where AWS refuses.)
    with pytest.raises(ServiceUnavailable, match=r"storage\.bucket"):
        await keys_of(storage.list())
    with pytest.raises(ServiceUnavailable, match=r"storage\.bucket"):
        await read_all(storage, "x")


async def test_wrong_credentials_name_the_settings(make_s3: Callable[..., Any]) -> None:
    storage = await make_s3(secret_access_key="wrong-" + uuid.uuid4().hex)
    with pytest.raises(UpstreamError, match=r"storage\.secret_access_key"):
        await storage.put("x", chunked(b"data"))


async def test_missing_object_is_not_found_and_range_of_it_too(make_s3: Callable[..., Any]) -> None:
    storage = await make_s3()
    with pytest.raises(NotFound):
        await read_all(storage, "nothing", 5)
    with pytest.raises(NotFound):
        await read_all(storage, "nothing", 100, 200)
