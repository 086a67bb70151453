"""The orphan sweep deletes exactly the blobs no row references and that are past the grace period."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batlehub.artifacts import blob_key
from batlehub.builtin.storage_filesystem import FilesystemStorage
from batlehub.db import SqliteDatabase
from batlehub.sweep import is_blob_key, sweep_orphans

HOUR = 3600.0


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[SqliteDatabase]:
    database = SqliteDatabase(tmp_path / "hub.db")
    await database.connect()
    await database.migrate()
    yield database
    await database.close()


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[FilesystemStorage]:
    backend = FilesystemStorage(tmp_path / "blobs")
    await backend.open()
    yield backend
    await backend.close()


async def _put(storage: FilesystemStorage, key: str, age_secs: float) -> None:
    await storage.put(key, _chunks(key.encode()))
    path = storage.local_path(key)
    assert path is not None
    then = time.time() - age_secs
    os.utime(path, (then, then))


async def test_sweep_deletes_only_old_unreferenced_blobs(db: SqliteDatabase, storage: FilesystemStorage) -> None:
    now = time.time()
    await _put(storage, "npm/blobs/sha512/aa/aa-version", 2 * HOUR)
    await _put(storage, "npm/blobs/sha512/bb/bb-artifact", 2 * HOUR)
    await _put(storage, "npm/blobs/sha512/cc/cc-orphan", 2 * HOUR)
    await _put(storage, "npm/blobs/sha512/dd/dd-in-flight", 60)
    await _put(storage, "other/not-a-blob", 2 * HOUR)
    await db.execute(
        "INSERT INTO versions (registry, name, version, manifest, artifact_key, created)"
        " VALUES ('npm', 'a', '1.0.0', '{}', $1, $2)",
        "npm/blobs/sha512/aa/aa-version",
        now,
    )
    await db.execute(
        "INSERT INTO artifacts (storage_key, size, sha512, sha1, created) VALUES ($1, 1, 'x', 'y', $2)",
        "npm/blobs/sha512/bb/bb-artifact",
        now,
    )

    result = await sweep_orphans(db, storage, grace_secs=HOUR)

    assert result.deleted == ["npm/blobs/sha512/cc/cc-orphan"]
    assert result.examined == 4
    remaining = {blob.key async for blob in storage.list("")}
    assert remaining == {
        "npm/blobs/sha512/aa/aa-version",
        "npm/blobs/sha512/bb/bb-artifact",
        "npm/blobs/sha512/dd/dd-in-flight",
        "other/not-a-blob",
    }


def test_only_format_blob_keys_are_swept() -> None:
    assert is_blob_key("npm/blobs/sha512/ab/abcdef")
    assert is_blob_key(blob_key("pypi", sha256_hex="ab" * 32))
    assert not is_blob_key("npm/packuments/x")
    assert not is_blob_key("blobs/x")
    assert not is_blob_key(".batlehub-probe/x")


def test_blob_keys_prefer_the_digests_they_always_did() -> None:
    sha512, sha1, sha256 = "a" * 128, "b" * 40, "c" * 64
    assert blob_key("npm", sha512, sha1, sha256_hex=sha256) == f"npm/blobs/sha512/aa/{sha512}"
    assert blob_key("npm", None, sha1, sha256_hex=sha256) == f"npm/blobs/sha1/bb/{sha1}"
    assert blob_key("pypi", sha256_hex=sha256.upper()) == f"pypi/blobs/sha256/cc/{sha256}"
    with pytest.raises(ValueError):
        blob_key("pypi", sha256_hex="c" * 63)
