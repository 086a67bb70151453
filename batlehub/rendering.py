"""Documents served from pre-rendered bytes: each rendered and gzipped once per revision and
variant (never per request), with a strong ETag (a 304 costs nothing).

`RenderedCache` keeps them within a memory budget and spills what does not fit to disk, where
they are served with sendfile, instead of dropping them (a big document dropped is a big document
rendered again). Rendering itself is the caller's, through `get_or_render`: one render per key at
a time, however many requests wait for it. Formats key entries by everything the bytes depend on
(package, revision stamp or upstream content id, variant, base URL) and check the shared revision
(`PackageStore.stamp`) before trusting one, so no entry outlives a write on any replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import logging
import os
import shutil
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from batlehub.blobresponse import open_blob
from batlehub.coordination import BackgroundWrites, SingleFlight

log = logging.getLogger(__name__)

GZIP_MIN_BYTES = 1024
"""Smaller bodies are sent as they are: gzip would save nothing worth its header."""
DEFAULT_MEMORY_BYTES = 64 * 1024 * 1024
DEFAULT_DISK_BYTES = 1024 * 1024 * 1024


def content_etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def revision_etag(stamp: str, variant: str, base_url: str) -> str:
    """A strong ETag known before building the document, so a 304 costs no database read."""
    return '"' + hashlib.sha256(f"{stamp}\0{variant}\0{base_url}".encode()).hexdigest()[:32] + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    candidates = [c.strip() for c in if_none_match.split(",")]
    return etag in candidates or f"W/{etag}" in candidates


def accepts(accept: str | None, media_type: str) -> bool:
    """Whether an `Accept` header lists `media_type` itself (not through a wildcard) without
    refusing it with `q=0`: how a client asks for a format's special form of a document."""
    if not accept:
        return False
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() == media_type:
            return not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params)
    return False


def gzipped(body: bytes) -> bytes | None:
    """The gzip form of `body`, or None when it is too small to be worth one (pure: may run in a
    worker process, see `batlehub.offload`)."""
    return gzip.compress(body, compresslevel=6, mtime=0) if len(body) >= GZIP_MIN_BYTES else None


@dataclass
class Rendered:
    """A document's bytes (and their gzip form), in memory or spilled to files."""

    etag: str
    content_type: str
    body: bytes | None = None
    gzip_body: bytes | None = None
    path: Path | None = None
    gzip_path: Path | None = None
    length: int = 0

    @classmethod
    def of(cls, body: bytes, etag: str, content_type: str, gzip_body: bytes | None = None) -> Rendered:
        """In-memory bytes; `gzip_body` as made by `gzipped` (computed here when not given)."""
        if gzip_body is None:
            gzip_body = gzipped(body)
        return cls(etag=etag, content_type=content_type, body=body, gzip_body=gzip_body, length=len(body))

    @property
    def size(self) -> int:
        """Bytes it takes where it is (memory or disk)."""
        return self.length + (
            len(self.gzip_body) if self.gzip_body else self.gzip_path.stat().st_size if self.gzip_path else 0
        )

    @property
    def in_memory(self) -> bool:
        return self.body is not None


def respond(request: web.Request, rendered: Rendered, headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """The answer for `rendered`: 304 when the client has it, gzipped when it asks, with its ETag
    and `Cache-Control: no-cache` (clients revalidate, cheaply); spilled documents go out with
    sendfile."""
    out = {"ETag": rendered.etag, "Cache-Control": "no-cache", **(headers or {})}
    if etag_matches(request.headers.get("If-None-Match"), rendered.etag):
        return web.Response(status=304, headers=out)
    wants_gzip = "gzip" in request.headers.get("Accept-Encoding", "").lower()
    if rendered.body is not None:
        body = rendered.body
        if wants_gzip and rendered.gzip_body is not None:
            body = rendered.gzip_body
            out["Content-Encoding"] = "gzip"
        return web.Response(body=body, content_type=rendered.content_type, headers=out)
    path = rendered.path
    if wants_gzip and rendered.gzip_path is not None:
        path = rendered.gzip_path
        out["Content-Encoding"] = "gzip"
    assert path is not None
    response = open_blob(path, {**out, "Content-Type": rendered.content_type})
    response.headers["ETag"] = rendered.etag  # the document's, not the file's
    return response


class RenderedCache:
    """Rendered documents within a memory budget, spilling to `spill_dir` (within its own budget)
    rather than dropping them; see the module docstring. Used on the event loop only."""

    def __init__(
        self,
        max_bytes: int = DEFAULT_MEMORY_BYTES,
        spill_dir: Path | None = None,
        max_spill_bytes: int = DEFAULT_DISK_BYTES,
    ) -> None:
        self.max_bytes = max_bytes
        self.spill_dir = spill_dir
        self.max_spill_bytes = max_spill_bytes
        self._memory: OrderedDict[tuple[Any, ...], Rendered] = OrderedDict()
        self._memory_bytes = 0
        self._disk: OrderedDict[tuple[Any, ...], Rendered] = OrderedDict()
        self._disk_bytes = 0
        self._flights = SingleFlight()
        self._writes = BackgroundWrites()
        if spill_dir is not None:
            # Files of an earlier run are not indexed: start empty rather than leak them.
            shutil.rmtree(spill_dir, ignore_errors=True)

    def get(self, key: tuple[Any, ...]) -> Rendered | None:
        for tier in (self._memory, self._disk):
            item = tier.get(key)
            if item is not None:
                tier.move_to_end(key)
                return item
        return None

    async def get_or_render(self, key: tuple[Any, ...], render: Callable[[], Awaitable[Rendered]]) -> Rendered:
        """The cached document, else `render()` once for all concurrent callers, then kept."""
        found = self.get(key)
        if found is not None:
            return found

        async def work() -> Rendered:
            rendered = await render()
            self.put(key, rendered)
            return rendered

        return await self._flights.run(repr(key), work)

    def put(self, key: tuple[Any, ...], item: Rendered) -> None:
        self._forget(key)
        if item.in_memory and item.size * 4 <= self.max_bytes:
            self._memory[key] = item
            self._memory_bytes += item.size
            while self._memory_bytes > self.max_bytes and self._memory:
                old_key, old = self._memory.popitem(last=False)
                self._memory_bytes -= old.size
                self._spill(old_key, old)
        elif item.in_memory:
            self._spill(key, item)  # too big for the memory budget: straight to disk

    def drop_package(self, name: str) -> None:
        """Forget a package's entries in this process (a write here; other replicas go by revision)."""
        for key in [k for k in self._memory if k[0] == name]:
            self._memory_bytes -= self._memory.pop(key).size
        for key in [k for k in self._disk if k[0] == name]:
            self._drop_files(key)

    async def settle(self) -> None:
        """Wait for spills in progress (tests, shutdown)."""
        await self._writes.settle()

    def _forget(self, key: tuple[Any, ...]) -> None:
        old = self._memory.pop(key, None)
        if old is not None:
            self._memory_bytes -= old.size
        if key in self._disk:
            self._drop_files(key)

    def _spill(self, key: tuple[Any, ...], item: Rendered) -> None:
        if self.spill_dir is None or item.body is None:
            return
        self._writes.spawn(self._write(key, item))

    async def _write(self, key: tuple[Any, ...], item: Rendered) -> None:
        assert self.spill_dir is not None and item.body is not None
        stem = hashlib.sha256(repr(key).encode()).hexdigest()[:40]
        path, gzip_path = self.spill_dir / f"{stem}.body", self.spill_dir / f"{stem}.gz"
        try:
            await asyncio.to_thread(_write_files, path, item.body, gzip_path, item.gzip_body)
        except OSError as exc:
            log.warning("could not spill a rendered document to %s: %s", self.spill_dir, exc)
            return
        spilled = Rendered(
            etag=item.etag,
            content_type=item.content_type,
            path=path,
            gzip_path=gzip_path if item.gzip_body is not None else None,
            length=len(item.body),
        )
        if key in self._memory or key in self._disk:
            return  # rendered again meanwhile: keep the newer copy
        self._disk[key] = spilled
        self._disk_bytes += spilled.length + (len(item.gzip_body) if item.gzip_body else 0)
        while self._disk_bytes > self.max_spill_bytes and len(self._disk) > 1:
            self._drop_files(next(iter(self._disk)))

    def _drop_files(self, key: tuple[Any, ...]) -> None:
        item = self._disk.pop(key)
        for path in (item.path, item.gzip_path):
            if path is not None:
                with contextlib.suppress(OSError):
                    self._disk_bytes -= path.stat().st_size
                    path.unlink()


def _write_files(path: Path, body: bytes, gzip_path: Path, gzip_body: bytes | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, data in ((path, body), (gzip_path, gzip_body)):
        if data is None:
            continue
        tmp = target.with_suffix(target.suffix + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
