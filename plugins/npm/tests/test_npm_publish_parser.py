"""The streaming reader of publish bodies: the tarball is decoded and handed on chunk by chunk,
never held whole; malformed bodies are clear 400s."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from batlehub_npm.integrity import expected_digests
from batlehub_npm.publish import TarballSink, max_body_bytes, parse_document
from npm_testdata import publish_body

from batlehub.app import installed_types
from batlehub.artifacts import ArtifactStore
from batlehub.builtin.storage_filesystem import FilesystemStorage
from batlehub.errors import BadRequest, IntegrityError, PayloadTooLarge
from batlehub.plugins import get_plugin_manager


def chunked(body: bytes, size: int) -> Callable[[], Awaitable[bytes]]:
    position = 0

    async def read() -> bytes:
        nonlocal position
        chunk = body[position : position + size]
        position += len(chunk)
        return chunk

    return read


class Collect:
    def __init__(self) -> None:
        self.sha512 = hashlib.sha512()
        self.size = 0
        self.largest_chunk = 0

    async def __call__(self, document: Any, filename: str, chunks: AsyncIterator[bytes]) -> str:
        async for chunk in chunks:
            self.sha512.update(chunk)
            self.size += len(chunk)
            self.largest_chunk = max(self.largest_chunk, len(chunk))
        return filename


@pytest.mark.parametrize("chunk_size", [1, 3, 4096, 1 << 20])
async def test_document_and_attachment_survive_any_chunking(chunk_size: int) -> None:
    tarball = os.urandom(30_000 if chunk_size == 1 else 300_000)
    body = publish_body("@s/p", "1.0.0", tarball, readme='tricky "quotes" \\ } ] { [ \u00e9\u4e2d')
    raw = json.dumps(body, ensure_ascii=chunk_size == 3).encode()
    collect = Collect()
    parsed = await parse_document(chunked(raw, chunk_size), store_attachment=collect)
    assert collect.sha512.digest() == hashlib.sha512(tarball).digest()
    expected = {k: v for k, v in body.items() if k != "_attachments"}
    assert parsed.document == expected
    assert parsed.attachments["@s/p-1.0.0.tgz"]["length"] == len(tarball)
    assert parsed.stored == "@s/p-1.0.0.tgz"


async def test_a_multi_megabyte_attachment_is_streamed_not_buffered() -> None:
    tarball = os.urandom(12 * 1024 * 1024)
    raw = json.dumps(publish_body("big", "1.0.0", tarball)).encode()  # ~16 MB of base64
    collect = Collect()
    tracemalloc.start()
    try:
        await parse_document(chunked(raw, 64 * 1024), store_attachment=collect)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert collect.size == len(tarball)
    assert peak < 4 * 1024 * 1024, f"parser held {peak} bytes at once"
    assert collect.largest_chunk < 1024 * 1024


async def test_escaped_slashes_in_base64_are_accepted() -> None:
    data = bytes(range(256)) * 10
    encoded = base64.b64encode(data).decode().replace("/", "\\/")
    raw = ('{"_attachments":{"f.tgz":{"data":"' + encoded + '"}}}').encode()
    collect = Collect()
    await parse_document(chunked(raw, 7), store_attachment=collect)
    assert collect.sha512.digest() == hashlib.sha512(data).digest()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"name": "x"', "expected ',' or '}'"),
        (b'{"name": }', "malformed package document"),
        (b'{"name": "x"} trailing', "unexpected data after the document"),
        (b'["not", "an", "object"]', "expected '{'"),
        (b'{"_attachments": {"f": {"data": "ab$c"}}}', "not valid base64"),
        (b'{"_attachments": {"f": {"data": "abc"}}}', "not valid base64"),
        (b'{"_attachments": {"f": {"data": "YQ==YWJj"}}}', "not valid base64"),
        (b'{"_attachments": {"f": {"data": 12}}}', "data must be a base64 string"),
        (b'{"_attachments": {"a": {"data": "YQ=="}, "b": {"data": "YQ=="}}}', "only one tarball"),
        (b'{"_attachments": {"f": {"data": "YWJj', "unexpected end of body"),
        (b"", "expected '{'"),
    ],
)
async def test_malformed_bodies_are_clear_400s(raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as refused:
        await parse_document(chunked(raw, 5), store_attachment=Collect())
    assert refused.value.status == 400


async def test_attachments_are_refused_where_no_publish_is_expected() -> None:
    with pytest.raises(BadRequest, match="only accepted when publishing"):
        await parse_document(chunked(b'{"_attachments": {"f": {"data": "YQ=="}}}', 5))


async def test_document_size_is_bounded_while_reading() -> None:
    raw = json.dumps({"readme": "x" * 200_000}).encode()
    with pytest.raises(PayloadTooLarge):
        await parse_document(chunked(raw, 4096), max_document_bytes=100_000)


def test_expected_digests_reads_sri_and_shasum() -> None:
    data = b"hello"
    sri = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    assert expected_digests({"integrity": sri, "shasum": hashlib.sha1(data).hexdigest()}, strict=True) == {
        "sha512": hashlib.sha512(data).hexdigest(),
        "sha1": hashlib.sha1(data).hexdigest(),
    }
    bad_values = (
        {"integrity": 5},
        {"shasum": "xyz"},
        {"integrity": "sha512-!!!"},
        {"integrity": "sha512-AAAA"},
        "nope",
    )
    for bad in bad_values:
        with pytest.raises(BadRequest):
            expected_digests(bad, strict=True)
    assert max_body_bytes(300) == 400 + 8 * 1024 * 1024


async def storage(tmp_path: Path) -> FilesystemStorage:
    backend = FilesystemStorage(tmp_path / "blobs")
    await backend.open()
    return backend


def artifacts(store: FilesystemStorage, max_size: int, spool_dir: Path) -> ArtifactStore:
    """An artifact store on `store`; publishes need no database, cache or upstream."""
    return ArtifactStore(
        format_name="npm",
        registry="npm",
        storage=store,
        storage_type=installed_types(get_plugin_manager()).storage["filesystem"],
        db=None,  # type: ignore[arg-type]
        cache=None,  # type: ignore[arg-type]
        http=None,  # type: ignore[arg-type]
        spool_dir=spool_dir,
        max_size=max_size,
    )


async def test_sink_stores_under_the_content_address_and_checks_integrity(tmp_path: Path) -> None:
    store = await storage(tmp_path)
    tarball = os.urandom(100_000)
    sink = TarballSink(artifacts(store, 10**6, tmp_path / "spool"))
    parsed = await parse_document(
        chunked(json.dumps(publish_body("p", "1.0.0", tarball)).encode(), 8192), store_attachment=sink
    )
    blob = await sink.finish(expected_digests(parsed.document["versions"]["1.0.0"]["dist"], strict=True))
    assert blob is not None and blob.sha512 == hashlib.sha512(tarball).hexdigest()
    assert blob.key == f"npm/blobs/sha512/{blob.sha512[:2]}/{blob.sha512}"
    assert [b.key async for b in store.list("npm/")] == [blob.key]

    lying = publish_body("p", "1.0.1", tarball, integrity_of=b"something else")
    with pytest.raises(IntegrityError):
        await parse_document(
            chunked(json.dumps(lying).encode(), 8192), store_attachment=TarballSink(artifacts(store, 10**6, tmp_path))
        )
    assert [b.key async for b in store.list("npm/")] == [blob.key]  # nothing new became visible

    with pytest.raises(PayloadTooLarge):
        await parse_document(
            chunked(json.dumps(publish_body("p", "1.0.2", tarball)).encode(), 8192),
            store_attachment=TarballSink(artifacts(store, 50_000, tmp_path)),
        )


async def test_sink_spools_when_the_manifest_comes_after_the_data(tmp_path: Path) -> None:
    store = await storage(tmp_path)
    tarball = os.urandom(50_000)
    body = publish_body("p", "1.0.0", tarball)
    reordered = {"_attachments": body.pop("_attachments"), **body}
    sink = TarballSink(artifacts(store, 10**6, tmp_path / "spool"))
    parsed = await parse_document(chunked(json.dumps(reordered).encode(), 4096), store_attachment=sink)
    blob = await sink.finish(expected_digests(parsed.document["versions"]["1.0.0"]["dist"], strict=True))
    assert blob is not None and blob.sha1 == hashlib.sha1(tarball).hexdigest()
    assert list((tmp_path / "spool").iterdir()) == []
