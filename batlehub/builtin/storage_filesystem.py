"""The `filesystem` storage backend: artifacts as plain files under one directory.

Plugin hooks implemented: `register_storage_backends`.

Every write goes to a temporary file under `<root>/.tmp/`, is hashed and size-checked while it
streams, fsynced, and only then renamed into place (an atomic `os.replace` on the same file
system), so a reader never sees half an object and a failed or refused upload leaves nothing.
Blocking file I/O runs in the default thread pool in blocks of `BLOCK_SIZE`, so a 500 MB tarball
never stalls the event loop for more than one block's worth of hashing.

Objects live on this machine only (`shared=False`): several replicas need a shared volume or the
`s3` backend. Because objects are real files, the backend offers `local_path` (sendfile).
"""

from __future__ import annotations

import asyncio
import errno
import os
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from stat import S_ISLNK, S_ISREG
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BeforeValidator, Field

from batlehub.configmodel import ConfigModel
from batlehub.errors import Conflict, InvalidKey, NotFound
from batlehub.interfaces import BlobStat, StorageBackendType, StoredBlob
from batlehub.plugins import hookimpl
from batlehub.storage import StreamDigest, validate_key, validate_prefix

if TYPE_CHECKING:
    from batlehub.config import Settings

BLOCK_SIZE = 1024 * 1024
"""Bytes gathered before one write (and read per chunk): big enough that thread hand-offs are
cheap next to the I/O, small enough that memory per upload stays flat."""

FILE_MODE = 0o644
"""mkstemp creates 0600 files; artifacts are public bytes that a sidecar (backup, web server) may read."""

MAX_REMEMBERED_DIRS = 100_000
"""Key directories whose escape check `local_path` remembers (npm's blobs spread over 256)."""
MAX_REMEMBERED_KEYS = 10_000
"""Validated keys `local_path` remembers (the hot downloads; ~300 bytes each)."""

TMP_DIR = ".tmp"
"""Directory under the root for uploads in flight. A top-level key segment of this name is refused."""


class FilesystemStorage:
    """A `StorageBackend` on a local (or mounted) directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._resolved_root: Path | None = None
        self._inside_dirs: dict[str, tuple[int, int]] = {}
        self._full_paths: dict[str, str] = {}

    # --- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the root and the temp directory; remember the root's real path for escape checks."""

        def prepare() -> Path:
            (self.root / TMP_DIR).mkdir(parents=True, exist_ok=True)
            return self.root.resolve(strict=True)

        self._resolved_root = await asyncio.to_thread(prepare)

    async def close(self) -> None:
        """Nothing to release: every operation opens and closes its own files."""

    async def ping(self) -> None:
        """Prove the root is writable by creating and removing a probe file in the temp directory."""

        def probe() -> None:
            fd, name = tempfile.mkstemp(prefix="ping-", dir=self.root / TMP_DIR)
            try:
                os.write(fd, b"ok")
            finally:
                os.close(fd)
                os.unlink(name)

        await asyncio.to_thread(probe)

    # --- paths ----------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        """The file for `key`, refusing anything that could land outside the root.

        `validate_key` refuses `..`, absolute paths and the like; the resolved-path check also
        catches a symlink inside the root that points elsewhere.
        """
        validate_key(key)
        if key.split("/", 1)[0] == TMP_DIR:
            raise InvalidKey(f"storage key {key!r} uses the reserved name {TMP_DIR!r}")
        root = self._root()
        path = root / key
        resolved = path.resolve(strict=False)
        if not resolved.is_relative_to(root) or resolved == root:
            raise InvalidKey(f"storage key {key!r} resolves outside the storage root")
        return path

    def _root(self) -> Path:
        if self._resolved_root is None:
            raise RuntimeError("FilesystemStorage used before open()")
        return self._resolved_root

    # --- writes ---------------------------------------------------------------------------------

    async def put(
        self,
        key: str,
        chunks: AsyncIterator[bytes],
        *,
        max_size: int | None = None,
        expected: Mapping[str, str] | None = None,
    ) -> StoredBlob:
        """Stream into a temp file, verify, fsync, then atomically rename onto `key`.

        An object smaller than `BLOCK_SIZE` (most package tarballs) is gathered in memory and
        written, synced and renamed in one thread hand-off instead of four: under a burst of
        downloads (a cold `npm install` through a proxy) the shared thread pool is the queue.
        """
        path = self._path(key)
        digest = StreamDigest(max_size)
        pending = bytearray()
        iterator = aiter(chunks)
        async for chunk in iterator:
            digest.update(chunk)  # raises PayloadTooLarge as soon as the limit is passed
            pending += chunk
            if len(pending) >= BLOCK_SIZE:
                break
        else:
            digest.check(expected)
            await asyncio.to_thread(_write_small, bytes(pending), path, self._root())
            return digest.blob(key)
        fd, tmp_name = await asyncio.to_thread(tempfile.mkstemp, prefix="put-", dir=self._root() / TMP_DIR)
        try:
            try:
                block, pending = bytes(pending), bytearray()
                await asyncio.to_thread(_write_all, fd, block)
                async for chunk in iterator:
                    digest.update(chunk)
                    pending += chunk
                    if len(pending) >= BLOCK_SIZE:
                        block, pending = bytes(pending), bytearray()
                        await asyncio.to_thread(_write_all, fd, block)
                if pending:
                    await asyncio.to_thread(_write_all, fd, bytes(pending))
                digest.check(expected)
                os.fchmod(fd, FILE_MODE)
                await asyncio.to_thread(os.fsync, fd)
            finally:
                os.close(fd)
            await asyncio.to_thread(_move_into_place, tmp_name, path, self._root())
        except BaseException:
            # Cancellation included: the temp file must not outlive a failed upload.
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise
        return digest.blob(key)

    async def delete(self, key: str) -> bool:
        """Remove the file, then any directories the removal left empty (so `list` stays cheap)."""
        path = self._path(key)

        def remove() -> bool:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            except IsADirectoryError:
                return False
            _prune_empty_parents(path.parent, self._root())
            return True

        return await asyncio.to_thread(remove)

    # --- reads ----------------------------------------------------------------------------------

    def get(self, key: str, start: int | None = None, end: int | None = None) -> AsyncIterator[bytes]:
        """Stream `[start, end)` of the object; see `batlehub.testing.storage_contract` for the rules."""
        path = self._path(key)
        _check_range(start, end)
        return self._read(key, path, start, end)

    async def _read(self, key: str, path: Path, start: int | None, end: int | None) -> AsyncIterator[bytes]:
        try:
            handle = await asyncio.to_thread(open, path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no stored object {key!r}") from None
        try:
            size = os.fstat(handle.fileno()).st_size
            first = min(start or 0, size)
            stop = size if end is None else min(end, size)
            remaining = max(0, stop - first)
            if first:
                handle.seek(first)
            while remaining > 0:
                block = await asyncio.to_thread(handle.read, min(BLOCK_SIZE, remaining))
                if not block:  # the file shrank under us; it cannot with atomic replaces, but be safe
                    break
                remaining -= len(block)
                yield block
        finally:
            handle.close()

    async def stat(self, key: str) -> BlobStat | None:
        path = self._path(key)

        def do_stat() -> BlobStat | None:
            try:
                st = path.stat()
            except (FileNotFoundError, NotADirectoryError):
                return None
            if not path.is_file():
                return None
            return BlobStat(key=key, size=st.st_size, modified=st.st_mtime)

        return await asyncio.to_thread(do_stat)

    async def list(self, prefix: str = "") -> AsyncIterator[BlobStat]:
        """Walk only the directory the prefix names (not the whole tree), one directory per thread
        hand-off, never following symlinks and skipping the temp directory."""
        validate_prefix(prefix)
        root = self._root()
        head, _, _ = prefix.rpartition("/")
        start_dir = root / head if head else root
        stack = [(start_dir, head)]
        while stack:
            directory, rel = stack.pop()
            entries = await asyncio.to_thread(_scan, directory)
            for name, is_dir, size, mtime in entries:
                key = f"{rel}/{name}" if rel else name
                if is_dir:
                    if key == TMP_DIR:
                        continue
                    # Descend only where keys could still match the prefix.
                    if key.startswith(prefix) or prefix.startswith(key + "/"):
                        stack.append((directory / name, key))
                elif key.startswith(prefix):
                    yield BlobStat(key=key, size=size, modified=mtime)

    # --- capabilities ---------------------------------------------------------------------------

    def local_path(self, key: str) -> Path | None:
        """The object's real path, so the server can use sendfile; None if it does not exist.

        Called on every download, so it avoids `Path.resolve()` (an `lstat` per path component)
        when it can: the key is validated as usual, the file itself is `lstat`ed (one system call,
        needed anyway to answer "does it exist"), and its directory is checked against the
        escape check's remembered result by device and inode (one `stat`). A directory swapped for
        a symlink that leads elsewhere has another inode, so it is resolved and checked again; a
        symlinked file always takes the full path.
        """
        root = self._root()
        full = self._full_paths.get(key)
        if full is None:
            validate_key(key)  # a pure function of the key: checked once per key
            if key.split("/", 1)[0] == TMP_DIR:
                raise InvalidKey(f"storage key {key!r} uses the reserved name {TMP_DIR!r}")
            full = f"{root}/{key}"
            if len(self._full_paths) >= MAX_REMEMBERED_KEYS:
                self._full_paths.clear()
            self._full_paths[key] = full
        try:
            st = os.lstat(full)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is not None and S_ISLNK(st.st_mode):
            return self._resolved_local_path(key)
        if not self._directory_is_inside(key.rpartition("/")[0]):
            raise InvalidKey(f"storage key {key!r} resolves outside the storage root")
        if st is None or not S_ISREG(st.st_mode):
            return None
        return root / key

    def _resolved_local_path(self, key: str) -> Path | None:
        path = self._path(key).resolve()
        return path if path.is_file() else None

    def _directory_is_inside(self, directory: str) -> bool:
        """Whether the key directory `directory` (relative, maybe "") lies inside the root.

        Remembers each checked directory's (device, inode); a later call costs one `stat`. A
        directory that does not exist yet is inside (nothing can be served from it)."""
        if not directory:
            return True
        root = self._root()
        try:
            st = os.stat(f"{root}/{directory}")
        except (FileNotFoundError, NotADirectoryError):
            return True
        identity = (st.st_dev, st.st_ino)
        if self._inside_dirs.get(directory) == identity:
            return True
        if not (root / directory).resolve(strict=False).is_relative_to(root):
            return False
        if len(self._inside_dirs) >= MAX_REMEMBERED_DIRS:
            self._inside_dirs.clear()
        self._inside_dirs[directory] = identity
        return True

    async def presigned_url(self, key: str, expires_secs: int = 300) -> str | None:
        """Files have no URL of their own: the hub serves them."""
        self._path(key)
        return None


# --- blocking helpers (run in threads) ----------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_small(data: bytes, path: Path, root: Path) -> None:
    """A whole small object in one go: temp file, write, fsync, rename into place."""
    fd, tmp_name = tempfile.mkstemp(prefix="put-", dir=root / TMP_DIR)
    try:
        try:
            _write_all(fd, data)
            os.fchmod(fd, FILE_MODE)
            os.fsync(fd)
        finally:
            os.close(fd)
        _move_into_place(tmp_name, path, root)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def _move_into_place(tmp_name: str, path: Path, root: Path) -> None:
    """Rename the finished temp file onto `path` and make the rename durable.

    A concurrent `delete` may prune a parent directory between our `mkdir` and `os.replace`; we
    create it again and retry rather than fail an upload for a race it did not cause.
    """
    for _attempt in range(5):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise Conflict(
                f"storage key {path.relative_to(root).as_posix()!r} collides with an existing object"
            ) from None
        try:
            os.replace(tmp_name, path)
            break
        except FileNotFoundError:
            continue
        except IsADirectoryError:
            raise Conflict(f"storage key {path.relative_to(root).as_posix()!r} is a prefix of other objects") from None
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise Conflict(
                    f"storage key {path.relative_to(root).as_posix()!r} is a prefix of other objects"
                ) from None
            raise
    else:
        raise OSError(f"could not create the directory for {path}")
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune_empty_parents(directory: Path, root: Path) -> None:
    while directory != root and directory.is_relative_to(root):
        try:
            directory.rmdir()
        except OSError:  # not empty (or already gone): stop climbing
            return
        directory = directory.parent


def _scan(directory: Path) -> list[tuple[str, bool, int, float]]:
    try:
        with os.scandir(directory) as it:
            out = []
            for entry in it:
                if entry.is_symlink():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    out.append((entry.name, True, 0, 0.0))
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    out.append((entry.name, False, st.st_size, st.st_mtime))
            return out
    except (FileNotFoundError, NotADirectoryError):
        return []


def _check_range(start: int | None, end: int | None) -> None:
    if (start is not None and start < 0) or (end is not None and end < 0):
        raise ValueError("byte range offsets must not be negative")


# --- plugin registration ------------------------------------------------------------------------


def _none_if_empty(value: Any) -> Any:
    # An empty value (often an unset environment variable) means "the default", as it always has.
    return None if value == "" else value


class FilesystemConfig(ConfigModel):
    """`[storage]` of `type = "filesystem"`."""

    path: Annotated[Path | None, Field(strict=False), BeforeValidator(_none_if_empty)] = None
    """None: `<data dir>/storage`. A leading `~` is expanded."""


def make_filesystem_storage(config: FilesystemConfig, settings: Settings) -> FilesystemStorage:
    """Build from the validated `[storage]` table: `path` defaults to `<data dir>/storage`."""
    if config.path is None:
        return FilesystemStorage(Path(settings.data_dir) / "storage")
    return FilesystemStorage(config.path.expanduser())


@hookimpl
def register_storage_backends() -> list[StorageBackendType]:
    return [
        StorageBackendType(
            name="filesystem",
            description="Files in a local directory (one machine, or a shared volume); supports sendfile.",
            factory=make_filesystem_storage,
            shared=False,
            capabilities=frozenset({"local_path"}),
            config_model=FilesystemConfig,
        )
    ]
