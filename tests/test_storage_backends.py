"""The built-in `filesystem` storage: the shared storage contract, plus what only a directory of
files can get wrong (symlinks, temp files, directory pruning, key/prefix collisions)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from batlehub.app import validate_config
from batlehub.builtin.storage_filesystem import TMP_DIR, FilesystemStorage
from batlehub.config import Settings
from batlehub.errors import ConfigError, Conflict, InvalidKey, NotFound
from batlehub.interfaces import StorageBackendType
from batlehub.testing.storage_contract import StorageBackendContract, chunked, keys_of, read_all, storage_type_named


class TestFilesystemContract(StorageBackendContract):
    @pytest.fixture
    def storage_type(self) -> StorageBackendType:
        return storage_type_named("filesystem")

    @pytest.fixture
    def storage_config(self, tmp_path: Path) -> dict[str, Any]:
        return {"path": str(tmp_path / "store")}


@pytest.fixture
async def fs(tmp_path: Path) -> AsyncIterator[FilesystemStorage]:
    backend = FilesystemStorage(tmp_path / "store")
    await backend.open()
    yield backend
    await backend.close()


def _build(table: dict[str, Any], settings: Settings) -> Any:
    descriptor = storage_type_named("filesystem")
    return descriptor.factory(validate_config(descriptor, table, path="storage", settings=settings), settings)


def test_descriptor() -> None:
    descriptor = storage_type_named("filesystem")
    assert descriptor.shared is False
    assert descriptor.capabilities == frozenset({"local_path"})
    assert set(descriptor.config_model.model_fields) == {"path"}


def test_path_defaults_to_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    backend = _build({"type": "filesystem"}, settings)
    assert isinstance(backend, FilesystemStorage)
    assert backend.root == tmp_path / "storage"
    assert _build({"type": "filesystem", "path": ""}, settings).root == tmp_path / "storage"  # an unset env var
    other = _build({"type": "filesystem", "path": str(tmp_path / "x")}, settings)
    assert isinstance(other, FilesystemStorage) and other.root == tmp_path / "x"


def test_path_must_be_a_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _build({"type": "filesystem", "path": 42}, Settings(data_dir=tmp_path))
    assert info.value.problems == ["storage.path: expected a path, got 42"]


async def test_symlink_inside_root_cannot_escape(fs: FilesystemStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"do not serve")
    (fs.root / "evil").symlink_to(outside, target_is_directory=True)

    with pytest.raises(InvalidKey):
        await read_all(fs, "evil/secret")
    with pytest.raises(InvalidKey):
        fs.local_path("evil/secret")
    with pytest.raises(InvalidKey):
        await fs.stat("evil/secret")
    with pytest.raises(InvalidKey):
        await fs.put("evil/planted", chunked(b"x"))
    with pytest.raises(InvalidKey):
        await fs.delete("evil/secret")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert await keys_of(fs.list()) == {}


async def test_percent_encoded_key_stays_inside_root(fs: FilesystemStorage) -> None:
    await fs.put("%2e%2e/%2e%2e/x", chunked(b"literal"))
    path = fs.local_path("%2e%2e/%2e%2e/x")
    assert path is not None and path.is_relative_to(fs.root.resolve())
    assert path.relative_to(fs.root.resolve()).parts == ("%2e%2e", "%2e%2e", "x")
    assert not (fs.root.parent / "x").exists()


async def test_symlinked_file_is_not_listed_or_served(fs: FilesystemStorage, tmp_path: Path) -> None:
    (tmp_path / "passwd").write_bytes(b"root:x:0:0")
    (fs.root / "link").symlink_to(tmp_path / "passwd")
    with pytest.raises(InvalidKey):
        await read_all(fs, "link")
    assert await keys_of(fs.list()) == {}


async def test_symlinked_root_is_fine(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    backend = FilesystemStorage(tmp_path / "alias")
    await backend.open()
    await backend.put("a/b", chunked(b"ok"))
    path = backend.local_path("a/b")
    assert path == real / "a" / "b"
    assert await read_all(backend, "a/b") == b"ok"


async def test_object_appears_only_when_complete(fs: FilesystemStorage) -> None:
    halfway = asyncio.Event()
    finish = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"a" * 2_000_000
        halfway.set()
        await finish.wait()
        yield b"b" * 10

    task = asyncio.create_task(fs.put("pkg/x.tgz", slow()))
    await asyncio.wait_for(halfway.wait(), 10)
    await asyncio.sleep(0.05)
    assert await fs.stat("pkg/x.tgz") is None
    assert not (fs.root / "pkg" / "x.tgz").exists()
    assert len(list((fs.root / TMP_DIR).iterdir())) == 1, "upload in flight lives in the temp dir"
    finish.set()
    blob = await task
    assert blob.size == 2_000_010
    assert list((fs.root / TMP_DIR).iterdir()) == []


async def test_failed_put_leaves_no_temp_file(fs: FilesystemStorage) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 3_000_000
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError):
        await fs.put("t/x", broken())
    assert list((fs.root / TMP_DIR).iterdir()) == []
    assert not (fs.root / "t").exists()


async def test_temp_dir_is_reserved_and_hidden(fs: FilesystemStorage) -> None:
    (fs.root / TMP_DIR / "stray").write_bytes(b"left by a crash")
    assert await keys_of(fs.list()) == {}
    assert await keys_of(fs.list(".tm")) == {}
    with pytest.raises(InvalidKey):
        await fs.put(f"{TMP_DIR}/stray", chunked(b"x"))
    with pytest.raises(InvalidKey):
        await read_all(fs, f"{TMP_DIR}/stray")
    # A deeper segment of that name is an ordinary key.
    await fs.put(f"a/{TMP_DIR}/b", chunked(b"fine"))
    assert set(await keys_of(fs.list())) == {f"a/{TMP_DIR}/b"}


async def test_delete_prunes_empty_directories(fs: FilesystemStorage) -> None:
    await fs.put("a/b/c/d", chunked(b"1"))
    await fs.put("a/keep", chunked(b"2"))
    assert await fs.delete("a/b/c/d")
    assert not (fs.root / "a" / "b").exists()
    assert (fs.root / "a" / "keep").is_file()
    assert fs.root.is_dir()


async def test_key_under_an_object_is_a_conflict(fs: FilesystemStorage) -> None:
    await fs.put("x", chunked(b"file"))
    with pytest.raises(Conflict):
        await fs.put("x/y", chunked(b"nested"))
    await fs.put("d/e", chunked(b"nested"))
    with pytest.raises(Conflict):
        await fs.put("d", chunked(b"file over dir"))
    assert list((fs.root / TMP_DIR).iterdir()) == []
    assert await read_all(fs, "x") == b"file"
    assert await read_all(fs, "d/e") == b"nested"
    with pytest.raises(NotFound):
        await read_all(fs, "d")


async def test_stored_files_are_world_readable_not_writable(fs: FilesystemStorage) -> None:
    await fs.put("perm/x", chunked(b"abc"))
    # Readable by a sidecar (backup, web server), writable only by the hub.
    assert (fs.root / "perm" / "x").stat().st_mode & 0o777 == 0o644


async def test_ping_fails_when_root_is_gone(fs: FilesystemStorage) -> None:
    await fs.ping()
    shutil.rmtree(fs.root)
    with pytest.raises(OSError):
        await fs.ping()


async def test_directory_swapped_for_a_symlink_after_a_download_cannot_escape(
    fs: FilesystemStorage, tmp_path: Path
) -> None:
    # local_path remembers directories it has checked; a directory replaced later by a symlink
    # that leads outside the root must be noticed, not served from the remembered answer.
    await fs.put("d/blob", chunked(b"inside"))
    assert fs.local_path("d/blob") == fs.root.resolve() / "d" / "blob"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "blob").write_bytes(b"do not serve")
    (fs.root / "d" / "blob").unlink()
    (fs.root / "d").rmdir()
    (fs.root / "d").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidKey):
        fs.local_path("d/blob")


async def test_local_path_of_missing_keys_and_directories(fs: FilesystemStorage) -> None:
    await fs.put("a/b/c", chunked(b"x"))
    assert fs.local_path("a/b/c") is not None
    assert fs.local_path("a/b") is None  # a directory is not an object
    assert fs.local_path("a/b/c/d") is None
    assert fs.local_path("nothing/here") is None
    with pytest.raises(InvalidKey):
        fs.local_path(".tmp/x")
