"""Documents served from pre-serialized bytes: each rendered once per revision and variant, with
a strong ETag (a 304 costs nothing), gzipped once on first demand, and kept in a per-process LRU
bounded by bytes. Formats key entries by everything the bytes depend on and check the shared
revision (`PackageStore.stamp`) before trusting one, so no entry outlives a write on any replica.
"""

from __future__ import annotations

import gzip
import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


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


@dataclass
class Rendered:
    """A serialized document and its ETag; the gzip form is computed once, on first demand."""

    body: bytes
    etag: str
    content_type: str
    _gzipped: bytes | None = field(default=None, repr=False)

    def gzipped(self) -> bytes:
        if self._gzipped is None:
            self._gzipped = gzip.compress(self.body, compresslevel=6, mtime=0)
        return self._gzipped

    @property
    def size(self) -> int:
        return len(self.body) + (len(self._gzipped) if self._gzipped else 0)


class RenderedCache:
    """Per-process LRU of rendered documents, bounded by total bytes.

    Keys start with the package name and contain everything the bytes depend on (revision stamp
    or upstream content id, variant, base URL). Used on the event loop only.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[Any, ...], Rendered] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple[Any, ...]) -> Rendered | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple[Any, ...], item: Rendered) -> None:
        if item.size * 4 > self.max_bytes:
            return  # one huge document must not flush everything else
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        self._items[key] = item
        self._bytes += item.size
        while self._bytes > self.max_bytes and self._items:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.size

    def drop_package(self, name: str) -> None:
        """Forget a package's entries in this process (a write here; other replicas go by revision)."""
        for key in [k for k in self._items if k[0] == name]:
            self._bytes -= self._items.pop(key).size


def respond(request: web.Request, rendered: Rendered, headers: Mapping[str, str] | None = None) -> web.Response:
    """The answer for `rendered`: 304 when the client has it, gzipped when it asks, with its
    ETag and `Cache-Control: no-cache` (clients revalidate, cheaply)."""
    out = {"ETag": rendered.etag, "Cache-Control": "no-cache", **(headers or {})}
    if etag_matches(request.headers.get("If-None-Match"), rendered.etag):
        return web.Response(status=304, headers=out)
    body = rendered.body
    if len(body) > 1024 and "gzip" in request.headers.get("Accept-Encoding", "").lower():
        body = rendered.gzipped()
        out["Content-Encoding"] = "gzip"
    return web.Response(body=body, content_type=rendered.content_type, headers=out)
