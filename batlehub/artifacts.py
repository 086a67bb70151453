"""Artifacts: the files of package versions, stored once per content in the storage backend.

An artifact's key is derived from its digest (`blob_key`): `<format>/blobs/sha512/<2>/<hex>`
(sha1 for old upstream metadata that gives nothing better, sha256 for upstreams that announce
only that, such as Python package indexes). This module is the one owner of
that rule; the orphan sweep relies on it (a key under `<format>/blobs/` that no row references is
garbage once it is older than the grace period).

`ArtifactStore` is what a format uses to keep and serve those bytes:
- `put` streams bytes whose digest is announced up front straight to their final key, verifying
  while they stream; `spool` + `put_spooled` handle bytes whose digest is known only afterwards;
- `fetch` downloads an upstream artifact once for every caller and replica, verified against the
  digests its metadata announces, and records it;
- `response` serves a stored artifact (sendfile, a presigned redirect, or a stream).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from yarl import URL

from batlehub.blobresponse import open_blob, plain_download
from batlehub.coordination import BackgroundWrites, FailOpenCache, LogThrottle, SingleFlight, under_lease
from batlehub.errors import IntegrityError, NotFound, PayloadTooLarge, UpstreamError
from batlehub.interfaces import StorageBackend, StorageBackendType, StoredBlob
from batlehub.metrics import Outcomes
from batlehub.outbound import UpstreamOrigins, failure_reason, origin_of
from batlehub.storage import StreamDigest
from batlehub.upstream import UpstreamStats

if TYPE_CHECKING:
    from batlehub.db import Connection, Database
    from batlehub.retention import UseLog

log = logging.getLogger(__name__)

ARTIFACT_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5, sock_read=60)
"""An artifact may legitimately take minutes; what must not happen is a silent, stalled socket."""
ARTIFACT_WAIT_SECS = 300.0
"""How long a replica watches another one's download (its holder extends the lease while bytes flow)."""
DISCARD_GRACE_SECS = 120.0
"""How long a blob left by a failed write waits before it is deleted (if still unreferenced then):
an identical publish in flight (a client's retry) commits its rows within this."""
STORED_MEMO_ENTRIES = 100_000
"""Keys a process remembers as stored, so a download asks neither the database nor storage."""
STORED_MEMO_SECS = 10.0
"""How long a key is remembered as stored without looking again: retention deletes a blob only
after every process has forgotten it (`batlehub.retention`)."""
CHUNK_SIZE = 64 * 1024
_HEX = re.compile(r"^[0-9a-f]+$")
VERIFIABLE = ("sha512", "sha256", "sha1")
"""The digests `StorageBackend.put` can check."""


class BlobMissing(Exception):
    """A blob that should be stored is not (any more)."""


def blob_key(
    format_name: str, sha512_hex: str | None = None, sha1_hex: str | None = None, *, sha256_hex: str | None = None
) -> str:
    """The storage key of an artifact: content-addressed, so equal bytes are stored once whether
    they were published here or fetched from an upstream. sha512 when known, else sha1 (old npm
    metadata), else sha256 (what Python package indexes announce). The order keeps every key
    that was derived before sha256 keys existed. Raises `ValueError` for a digest that is not one."""
    for algorithm, value, length in (("sha512", sha512_hex, 128), ("sha1", sha1_hex, 40), ("sha256", sha256_hex, 64)):
        if value:
            digest = value.lower()
            if len(digest) != length or not _HEX.match(digest):
                raise ValueError(f"not a {algorithm} hex digest: {value!r}")
            return f"{format_name}/blobs/{algorithm}/{digest[:2]}/{digest}"
    raise ValueError("a blob key needs a sha512, sha1 or sha256 digest")


def is_blob_key(key: str) -> bool:
    """`<format>/blobs/...`: the content-addressed keys whose owners are database rows."""
    parts = key.split("/")
    return len(parts) > 2 and parts[1] == "blobs"


def check_digests(expected: Mapping[str, str]) -> dict[str, str]:
    """`expected` limited to digests storage can verify, each checked to be lowercase hex of the
    right length. Raises `IntegrityError` for a malformed one (it could never match)."""
    lengths = {"sha512": 128, "sha256": 64, "sha1": 40}
    out: dict[str, str] = {}
    for algorithm, digest in expected.items():
        if algorithm not in lengths:
            continue
        value = str(digest).lower()
        if len(value) != lengths[algorithm] or not _HEX.match(value):
            raise IntegrityError(f"the announced {algorithm} digest is malformed")
        out[algorithm] = value
    return out


@dataclass
class SpooledBlob:
    """Bytes received into a temporary file, digests known, not stored yet."""

    path: Path
    digest: StreamDigest

    def digests(self) -> dict[str, str]:
        return self.digest.digests()

    @property
    def size(self) -> int:
        return self.digest.size

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


LOCAL_KEY_MEMO_ENTRIES = 100_000
"""(package, revision stamp, file) -> storage key entries a registry's process remembers (~200 bytes each)."""


class ArtifactStore:
    """One format's artifacts in the storage backend (see the module docstring)."""

    def __init__(
        self,
        *,
        format_name: str,
        registry: str,
        storage: StorageBackend,
        storage_type: StorageBackendType,
        db: Database,
        cache: FailOpenCache,
        http: Callable[[], aiohttp.ClientSession],
        spool_dir: Path,
        max_size: int,
        stats: UpstreamStats | None = None,
        origins: UpstreamOrigins | None = None,
        uses: UseLog | None = None,
        shared_cache: bool = False,
    ) -> None:
        self.format_name = format_name
        self.registry = registry
        self.storage = storage
        self.db = db
        self.cache = cache
        self._shared = shared_cache
        """Whether other replicas wait on this one's downloads (a shared cache backend holds the leases)."""
        self.http = http
        self.spool_dir = spool_dir
        self.max_size = max_size
        self.stats = stats or UpstreamStats()
        self.origins = origins or UpstreamOrigins(registry=registry)
        """Where `fetch` may download from: the registry's upstreams (see `UpstreamOrigins`)."""
        self.timeout = ARTIFACT_TIMEOUT
        self.discard_grace_secs = DISCARD_GRACE_SECS
        self.writes = BackgroundWrites()
        self._discards: set[asyncio.Future[None]] = set()
        # With local files, `local_path(key) is None` means "not stored": no round trip needed.
        self._local_files = "local_path" in storage_type.capabilities
        self._flights = SingleFlight(kind="artifact")
        self._lookups = Outcomes(lambda m: m.artifacts, registry, format_name)
        self._stored: dict[str, float] = {}
        self.uses = uses
        """Where served upstream artifacts are noted, for retention's least-recently-used order."""
        self._warn_allowed = LogThrottle()
        self._local_keys: dict[tuple[str, str, str], str] = {}

    def key_for(self, digests: Mapping[str, str]) -> str:
        return blob_key(self.format_name, digests.get("sha512"), digests.get("sha1"), sha256_hex=digests.get("sha256"))

    async def close(self) -> None:
        await self._flights.cancel_all()
        # Blobs still waiting to be discarded are left to the sweep: no shutdown waits minutes.
        for task in list(self._discards):
            task.cancel()
        await asyncio.gather(*self._discards, return_exceptions=True)
        await self.settle()

    async def settle(self) -> None:
        """Wait for the bookkeeping written after answering."""
        await self.writes.settle()

    # --- keeping bytes ----------------------------------------------------------------------------

    async def put(self, chunks: AsyncIterator[bytes], expected: Mapping[str, str]) -> StoredBlob:
        """Store bytes whose sha512 is announced up front, verifying every announced digest while
        they stream. Raises `IntegrityError` (nothing stored) on a mismatch."""
        expected = check_digests(expected)
        if "sha512" not in expected:
            spooled = await self.spool(chunks)
            try:
                return await self.put_spooled(spooled, expected)
            finally:
                spooled.discard()
        return await self.storage.put(self.key_for(expected), chunks, max_size=self.max_size, expected=expected)

    async def spool(self, chunks: AsyncIterator[bytes]) -> SpooledBlob:
        """Receive bytes into a temporary file (for when their digests are announced only after
        them); `put_spooled` stores them, `SpooledBlob.discard` drops them."""
        await asyncio.to_thread(self.spool_dir.mkdir, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{self.format_name}-upload-", dir=self.spool_dir)
        digest = StreamDigest(self.max_size)
        try:
            with os.fdopen(fd, "wb") as fh:
                async for chunk in chunks:
                    digest.update(chunk)
                    await asyncio.to_thread(fh.write, chunk)
        except BaseException:
            os.unlink(name)
            raise
        return SpooledBlob(Path(name), digest)

    async def put_spooled(self, spooled: SpooledBlob, expected: Mapping[str, str]) -> StoredBlob:
        """Verify spooled bytes against `expected`, then store them under their content key."""
        spooled.digest.check(check_digests(expected))
        digests = spooled.digests()

        async def file_chunks() -> AsyncIterator[bytes]:
            fh = await asyncio.to_thread(spooled.path.open, "rb")
            try:
                while block := await asyncio.to_thread(fh.read, 1024 * 1024):
                    yield block
            finally:
                fh.close()

        return await self.storage.put(self.key_for(digests), file_chunks(), max_size=self.max_size, expected=digests)

    def discard(self, blob: StoredBlob | SpooledBlob | None) -> None:
        """Drop what a failed write left: a spooled file at once, a stored blob after
        `DISCARD_GRACE_SECS` unless a row references it by then (instead of keeping it, outside
        every quota, until the sweep's much longer grace period)."""
        if isinstance(blob, SpooledBlob):
            blob.discard()
        elif blob is not None:
            task = asyncio.ensure_future(self._discard_later(blob.key))
            self._discards.add(task)
            task.add_done_callback(self._discards.discard)

    async def _discard_later(self, key: str) -> None:
        await asyncio.sleep(self.discard_grace_secs)
        try:
            if not await is_referenced(self.db, key) and await self.storage.delete(key):
                self.forget(key)
                log.info("registry %s: deleted %s, left by a write that failed", self.registry, key)
        except Exception as exc:  # the sweep collects it later
            if self._warn_allowed("discard"):
                log.warning("registry %s: could not delete %s after a failed write: %s", self.registry, key, exc)

    # --- upstream artifacts ---------------------------------------------------------------------

    async def fetch(self, url: str, expected: Mapping[str, str], *, what: str) -> str:
        """The key of the verified artifact at `url`, downloading it first if it is not stored yet
        (once for all callers and replicas). `what` names it in messages (`name@version`).

        Raises `IntegrityError` (nothing stored) when the bytes do not match `expected`, or when
        `expected` has no sha512, sha256 or sha1 to check against."""
        expected = check_digests(expected)
        if not expected:
            raise IntegrityError(f"cannot verify {what}: its upstream metadata has no sha512, sha256 or sha1 digest")
        key = self.key_for(expected)
        if self.uses is not None:
            self.uses.artifact(key, url, what)
        stored_at = self._stored.get(key)
        if stored_at is not None and time.monotonic() - stored_at < STORED_MEMO_SECS:
            self._lookups("hit")
            return key
        if await self.ready(key):
            self.remember(key)
            self._lookups("hit")
            return key
        if not url.startswith(("http://", "https://")):
            raise UpstreamError(f"the upstream metadata of {what} has no usable download URL")
        if not self.origins.allows(URL(url)):
            log.warning("registry %s: refused to fetch %s from %s: not a configured upstream", self.registry, what, url)
            raise UpstreamError(f"the upstream metadata of {what} points its download outside the configured upstreams")

        async def ready() -> str | None:
            return key if await self.ready(key) else None

        async def download() -> str:
            return await under_lease(
                self.cache,
                f"lease:blob:{key}",
                wait_secs=ARTIFACT_WAIT_SECS,
                ready=ready,
                work=lambda: self._download(url, key, expected, what),
                checked=True,
                kind="artifact",
            )

        self._lookups("miss")
        key = await self._flights.run(key, download)
        self.remember(key)
        return key

    def remember(self, key: str) -> None:
        if len(self._stored) >= STORED_MEMO_ENTRIES:
            self._stored.clear()
        self._stored[key] = time.monotonic()

    def forget(self, key: str) -> None:
        """The blob under `key` turned out to be missing (the sweep deletes blobs whose rows are
        gone) or was evicted: the next `fetch` checks again and downloads it anew."""
        self._stored.pop(key, None)

    async def ready(self, key: str) -> bool:
        """Stored and recorded. With local files the file is looked at first (one `lstat`, no
        thread), so a miss costs no database statement: a cold install misses on every artifact,
        and on SQLite every statement waits its turn for the one connection."""
        if self._local_files:
            if self.storage.local_path(key) is None:
                return False
            return await self.db.fetchrow("SELECT size FROM artifacts WHERE storage_key = $1", key) is not None
        row = await self.db.fetchrow("SELECT size FROM artifacts WHERE storage_key = $1", key)
        return row is not None and await self.storage.stat(key) is not None

    async def _download(self, url: str, key: str, expected: dict[str, str], what: str) -> str:
        limit = self.max_size
        self.stats.artifact_downloads += 1
        try:
            async with self.origins.request(
                self.http(),
                "GET",
                url,
                # The digests are of the bytes as published: never let a transfer encoding change them.
                headers={"Accept": "application/octet-stream", "Accept-Encoding": "identity"},
                timeout=self.timeout,
                auto_decompress=False,
            ) as resp:
                if resp.status in (404, 410):
                    raise NotFound(f"{what} is not on the upstream registry")
                if resp.status != 200:
                    raise UpstreamError(f"upstream registry answered HTTP {resp.status} for {what}")
                if resp.content_length is not None and resp.content_length > limit:
                    raise PayloadTooLarge(f"{what} is larger than the limit of {limit} bytes")
                try:
                    blob = await self.storage.put(
                        key, resp.content.iter_chunked(CHUNK_SIZE), max_size=limit, expected=expected
                    )
                except IntegrityError as exc:
                    log.warning("registry %s: refused %s from %s: %s", self.registry, what, url, exc)
                    raise IntegrityError(
                        f"integrity check failed for {what}: upstream bytes do not match the"
                        f" {'/'.join(sorted(expected))} digest its metadata announces; nothing was stored"
                    ) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("registry %s: cannot fetch %s: %s", self.registry, url, exc)
            raise UpstreamError(
                f"cannot fetch {what} from the upstream registry {origin_of(url)} ({failure_reason(exc)})"
            ) from exc
        # Alone, the row is written after answering (awaited by `close`): until the sweep's grace
        # period has passed, a fresh blob is safe without it, and this process remembers the key as
        # stored. If the write fails, the sweep may collect the blob later; it is fetched again.
        # With replicas, it is written before the lease is let go: a replica waiting on this download
        # finds the artifact ready (`ready` reads the row) instead of downloading it again.
        if self._shared:
            await self._record(blob, url, what)
        else:
            self.writes.spawn(self._record(blob, url, what))
        log.info("registry %s: stored %s (%d bytes) from %s", self.registry, what, blob.size, url)
        return key

    async def _record(self, blob: StoredBlob, url: str, what: str) -> None:
        try:
            async with self.db.transaction() as conn:
                await record_artifact(conn, blob)
                await record_claim(conn, self.registry, blob.key, url, what, blob.size)
        except Exception as exc:
            self.forget(blob.key)
            if self._warn_allowed("db-write"):
                log.warning("registry %s: cannot record the stored blob %s: %s", self.registry, blob.key, exc)

    # --- serving --------------------------------------------------------------------------------

    async def read(self, key: str, max_bytes: int) -> bytes:
        """A small stored blob's bytes (a format reads e.g. a package's metadata file it fetched
        and verified). Raises `BlobMissing` when storage does not have it, `PayloadTooLarge` past
        `max_bytes`."""
        data = bytearray()
        try:
            async for chunk in self.storage.get(key):
                data += chunk
                if len(data) > max_bytes:
                    raise PayloadTooLarge(f"the stored blob {key} is larger than {max_bytes} bytes")
        except NotFound:
            raise BlobMissing(key) from None
        return bytes(data)

    async def response(
        self, request: web.Request, key: str, filename: str, content_type: str = "application/octet-stream"
    ) -> web.StreamResponse:
        """The response that sends a stored blob. Raises `BlobMissing` when storage does not have
        it, before anything is sent, so a caller that trusted a memo can look again."""
        headers = {
            "Content-Type": content_type,
            "Cache-Control": "public, max-age=31536000, immutable",
            "Content-Disposition": f'attachment; filename="{filename}"',
        }
        path = self.storage.local_path(key)
        if path is not None:
            if not plain_download(request):
                return web.FileResponse(path, headers=headers)  # Range and conditional requests
            try:
                return open_blob(path, headers)
            except FileNotFoundError:
                raise BlobMissing(key) from None
        url = await self.storage.presigned_url(key)
        if url:
            return web.Response(status=302, headers={"Location": url, "Cache-Control": "no-store"})
        stat = await self.storage.stat(key)
        if stat is None:
            raise BlobMissing(key)
        response = web.StreamResponse(headers={**headers, "Content-Length": str(stat.size)})
        await response.prepare(request)
        if request.method != "HEAD":
            async for chunk in self.storage.get(key):
                await response.write(chunk)
        await response.write_eof()
        return response

    async def local_response(
        self,
        request: web.Request,
        memo: tuple[str, str, str],
        lookup: Callable[[], Awaitable[str | None]],
        filename: str,
        *,
        not_found: str,
        what: str = "file",
        content_type: str = "application/octet-stream",
    ) -> web.StreamResponse:
        """Serve a local file whose storage key `lookup()` reads from the package store (None:
        404 with `not_found`). `memo` is (package, revision stamp, file): the stamp is the shared
        revision, which every write changes, so a key remembered under it is as good as a query
        (an install asks for every file once per client)."""
        key = self._local_keys.get(memo)
        if key is not None:
            try:
                return await self.response(request, key, filename, content_type)
            except BlobMissing:
                del self._local_keys[memo]  # gone from storage under us: ask the database again
        key = await lookup()
        if key is None:
            raise NotFound(not_found)
        if len(self._local_keys) >= LOCAL_KEY_MEMO_ENTRIES:
            self._local_keys.clear()
        self._local_keys[memo] = key
        try:
            return await self.response(request, key, filename, content_type)
        except BlobMissing:
            raise NotFound(f"{what} {filename} is missing from storage") from None

    async def fetched_response(
        self,
        request: web.Request,
        fetch: Callable[[], Awaitable[str]],
        filename: str,
        *,
        what: str = "file",
        content_type: str = "application/octet-stream",
    ) -> web.StreamResponse:
        """Serve an upstream file whose storage key `fetch()` gives (downloading it first if need
        be, see `fetch`). A key remembered as stored that the sweep (or an operator) removed
        since is forgotten and fetched once more."""
        key = await fetch()
        try:
            return await self.response(request, key, filename, content_type)
        except BlobMissing:
            self.forget(key)
        key = await fetch()
        try:
            return await self.response(request, key, filename, content_type)
        except BlobMissing:
            raise NotFound(f"{what} {filename} is missing from storage") from None


class IncomingBlob:
    """One upload's bytes, kept while they arrive: straight into storage under their content key
    when the expected sha512 is known by then, else into a spool file until `finish` is told what
    to verify them against (a client may announce the digests after the bytes)."""

    def __init__(self, artifacts: ArtifactStore) -> None:
        self.artifacts = artifacts
        self._result: StoredBlob | SpooledBlob | None = None

    async def receive(self, chunks: AsyncIterator[bytes], expected: Mapping[str, str]) -> StoredBlob | SpooledBlob:
        """Take the bytes; with a sha512 in `expected` they are verified and stored now."""
        if "sha512" in expected:
            self._result = await self.artifacts.put(chunks, expected)
        else:
            self._result = await self.artifacts.spool(chunks)
        return self._result

    @property
    def size(self) -> int | None:
        """Bytes received, before `finish` too; None if none were."""
        return None if self._result is None else self._result.size

    async def finish(self, expected: Mapping[str, str]) -> StoredBlob | None:
        """The stored blob, spooled bytes verified against `expected` first; None if no bytes
        were received."""
        result = self._result
        if result is None or isinstance(result, StoredBlob):
            return result
        try:
            blob = await self.artifacts.put_spooled(result, expected)
        finally:
            result.discard()
        self._result = blob
        return blob

    def discard(self) -> None:
        """The upload failed: drop what it received (see `ArtifactStore.discard`)."""
        self.artifacts.discard(self._result)
        self._result = None


async def is_referenced(db: Connection, key: str) -> bool:
    """Whether a database row names the blob (a file, a version, a recorded artifact, or a big
    upstream document)."""
    row = await db.fetchrow(
        "SELECT 1 AS hit FROM artifacts WHERE storage_key = $1"
        " UNION ALL SELECT 1 AS hit FROM files WHERE artifact_key = $1"
        " UNION ALL SELECT 1 AS hit FROM versions WHERE artifact_key = $1"
        " UNION ALL SELECT 1 AS hit FROM upstream_documents WHERE body_key = $1 LIMIT 1",
        key,
    )
    return row is not None


async def record_artifact(conn: Connection, blob: StoredBlob) -> None:
    """The `artifacts` row of a stored blob (what tells the sweep it is wanted)."""
    await conn.execute(
        "INSERT INTO artifacts (storage_key, size, sha512, sha1, sha256, created) VALUES ($1, $2, $3, $4, $5, $6)"
        " ON CONFLICT (storage_key) DO NOTHING",
        blob.key,
        blob.size,
        blob.sha512,
        blob.sha1,
        blob.sha256,
        time.time(),
    )


async def record_claim(conn: Connection, registry: str, key: str, url: str, what: str, size: int) -> None:
    """A registry's claim on an artifact it fetched from `url` upstream: what its retention may
    evict (`batlehub.retention`); `what` names it for people (`name@version`)."""
    now = time.time()
    await conn.execute(
        "INSERT INTO cached_artifacts (registry, storage_key, url, what, size, fetched, last_used)"
        " VALUES ($1, $2, $3, $4, $5, $6, $6)"
        " ON CONFLICT (registry, storage_key) DO UPDATE SET last_used = excluded.last_used, url = excluded.url",
        registry,
        key,
        url,
        what,
        size,
        now,
    )
