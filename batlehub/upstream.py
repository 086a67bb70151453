"""Documents from upstream registries, asked for as rarely as possible and served when the
upstreams are down. Every format's proxy goes through here; the format only says how its documents
are addressed and checked (`DocumentFormat`).

- A document is asked for once per `metadata_ttl_secs`, however many clients and replicas want it
  at the same moment: one task per key in a process fetches while the others await it, and across
  replicas that task first takes a lease in the cache backend; a replica that finds the lease
  taken watches the cache for the result instead of asking the upstream too.
- An expired copy is revalidated with `If-None-Match` / `If-Modified-Since`; a 304 renews it
  without downloading the body again.
- Every good copy is kept twice: in the cache backend (shared and fast) and durably, so
  `serve_stale` still works after a restart or a cache flush: in the database table
  `upstream_documents`, whose row holds the body itself up to `STORED_BODY_MIN_BYTES` and names a
  content-addressed blob in the storage backend beyond (a 20 MB write would hold SQLite's one
  connection, and everyone waiting for it, for a long moment, and bloat the database).
- A name every upstream answers 404 for is remembered as absent for a short while
  (`NOT_FOUND_TTL_SECS`), so a typo in a lockfile does not cost an upstream request per client.
- A name reserved for local use (`PackageStore.is_reserved`) is never asked for at all.

Stored copies use one small format, the "envelope": a JSON header line (upstream, validators, a
content id) followed by a newline and the upstream's body bytes exactly as received. The cache
holds the header alone under a key that is fresh for the TTL (a freshness check reads a few
hundred bytes, not the whole document); a shared cache also holds the envelope under a second key.
Documents are kept as the bytes the upstream sent, never as parsed objects (a parsed 20 MB
packument takes ten times that in memory): each process remembers the hottest bodies (keyed by
content id, bounded by bytes), formats render them once per content id (`batlehub.rendering`), and
read what they need from them with `extract`, which parses big documents in a worker process
(`batlehub.offload`) and remembers the small answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from yarl import URL

from batlehub.coordination import BackgroundWrites, FailOpenCache, LogThrottle, SingleFlight, under_lease
from batlehub.errors import NotFound, UpstreamError
from batlehub.metrics import Outcomes
from batlehub.offload import Offloader
from batlehub.outbound import UpstreamOrigins, failure_reason, origin_of

if TYPE_CHECKING:
    from batlehub.db import Database
    from batlehub.interfaces import StorageBackend
    from batlehub.retention import UseLog

log = logging.getLogger(__name__)

T = TypeVar("T")

METADATA_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=5, sock_connect=5)
FORWARD_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=5, sock_connect=5)
METADATA_WAIT_SECS = 5.0
"""How long a replica waits for another one's fetch of a document before asking the upstream itself."""
FAILURE_BACKOFF_SECS = 10.0
"""After the upstreams failed for a name, serve its stale copy without asking them again for this
long, so an outage does not cost every request a connect timeout."""
NOT_FOUND_TTL_SECS = 30.0
"""How long "no upstream has this name" is believed (never longer than the registry's TTL)."""
COPY_RETENTION_SECS = 7 * 86400.0
"""How long the cache keeps a copy past its freshness (the database keeps it regardless)."""
MEMO_MAX_BYTES = 32 * 1024 * 1024
"""Bodies of documents kept in memory, so a hot document is not read from the cache or the
database on every request."""
MEMO_MAX_ENTRIES = 1024
FRESH_HERE_MAX_ENTRIES = 10_000
EXTRACTS_MAX_ENTRIES = 4096
"""Answers of `extract` kept per process (small: a version's manifest, the dist-tags)."""
CACHED_BODY_MAX_BYTES = 8 * 1024 * 1024
"""Bodies larger than this are not put into a shared cache (they would slow it down for everyone);
replicas read them from the database instead, once per change thanks to the memo."""
CHUNK_SIZE = 64 * 1024
STORAGE_CHUNK_SIZE = 1024 * 1024
STORED_BODY_MIN_BYTES = 1024 * 1024
"""Bodies from this size on are kept in the storage backend, the database row naming them."""


# --- what a format tells core ---------------------------------------------------------------------


def _same_variant(requested: str, content_type: str) -> str:
    return requested


@dataclass(frozen=True)
class DocumentFormat:
    """How one format's upstream documents are addressed and checked."""

    path: Callable[[str], str]
    """A name's document path under an upstream base URL, already percent-encoded. Raise
    `BadRequest` for names that cannot be one path."""
    accept: Mapping[str, str]
    """Variant -> the `Accept` header to ask for it with. The first variant is the default."""
    check: Callable[[bytes], bytes]
    """Check a 200 body and return the bytes to keep (repaired if need be, e.g. lone surrogates
    replaced); raise `ValueError` when it is not a usable document. A pure, module-level function:
    for big bodies it runs in a worker process."""
    variant_of: Callable[[str, str], str] = _same_variant
    """(requested variant, response content type) -> the variant the upstream actually sent."""
    answers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Variant -> the stored variants that can answer a request for it, in order (default: itself
    only). E.g. npm's full packument also answers a request for the abbreviated one."""
    summarize: Callable[[bytes], DocumentSummary] | None = None
    """What a listing shows of a checked body (its description and latest version), kept beside
    the stored copy so that the web UI lists cached names without reading their documents. A pure,
    module-level function, run with `check` (in a worker process for big bodies). None: listings
    show the names alone."""
    versions: Callable[[bytes], dict[str, float | None]] | None = None
    """Policies: the versions a document lists, each with its publish time at the upstream
    (epoch seconds; None when the document has no usable time). Pure, module-level (runs in a
    worker process for big documents). None: policies cannot see into this format's documents."""
    without: Callable[[bytes, tuple[str, ...]], bytes] | None = None
    """Policies: the document without the given versions, as bytes of the same variant, and
    consistent (npm: `latest` moved to the newest version left, other tags on removed versions
    dropped). Pure, module-level, like `check`."""
    timed_variant: str | None = None
    """The variant whose documents carry publish times (npm: the full packument; the abbreviated
    one has none). A registry whose policies need times asks for it in place of the others."""

    @property
    def default_variant(self) -> str:
        return next(iter(self.accept))

    def stored_variants(self, variant: str) -> tuple[str, ...]:
        return self.answers.get(variant, (variant,))


@dataclass(frozen=True)
class DocumentSummary:
    """A proxied package as a listing shows it (see `DocumentFormat.summarize`)."""

    description: str = ""
    latest: str = ""
    modified: str = ""
    """When the package last changed upstream, as the upstream wrote it (RFC 3339), if it says."""
    maintainers: tuple[str, ...] = ()


@dataclass(frozen=True)
class KnownPackage:
    """A name whose document the hub holds from an upstream, with its summary."""

    name: str
    description: str
    latest: str
    fetched: float
    modified: str = ""
    maintainers: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpstreamDocument:
    """A document from an upstream registry, as the bytes the upstream sent (after `check`).

    `body` is None when the bytes were not at hand (a big document, not kept in memory): what is
    derived from them is keyed by `content_id`, so they are read (`UpstreamDocuments.read`) only
    when something must be derived anew."""

    name: str
    body: bytes | None
    upstream: str
    """Base URL of the upstream it came from (with trailing slash)."""
    fetched_at: float
    """Epoch seconds of the last time an upstream confirmed this content (200 or 304)."""
    stale: bool
    """True when served from the last good copy because the upstreams failed."""
    content_id: str = ""
    """Changes exactly when the upstream's bytes change (not on a 304 renewal): a good key for
    anything derived from the body, such as pre-rendered responses."""
    variant: str = ""
    """The variant the body is (may differ from the one asked for, see `DocumentFormat.answers`)."""
    withheld: tuple[str, ...] = ()
    """Versions the registry's policies withhold from this view of the document (sorted): its
    bytes are the upstream's without them (`DocumentFormat.without`), and `content_id` differs
    from the upstream copy's (`batlehub.policy_documents`)."""
    source_id: str = ""
    """With `withheld`: the content id of the upstream copy this view was made from."""


@dataclass
class UpstreamStats:
    """What this process asked the upstreams, for tests and diagnostics."""

    metadata_requests: int = 0
    """HTTP requests for documents, whatever their answer."""
    metadata_downloads: int = 0
    """Of those, answered 200 with a body."""
    not_modified: int = 0
    """Of those, answered 304: the copy was renewed without a download."""
    not_found: int = 0
    failures: int = 0
    """Errors, timeouts and unexpected statuses."""
    artifact_downloads: int = 0
    forwarded: int = 0
    cache_hits: int = 0
    stale_served: int = 0

    @property
    def requests(self) -> int:
        """Every HTTP request this process sent upstream."""
        return self.metadata_requests + self.artifact_downloads + self.forwarded


# --- stored copies ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Copy:
    """Where one stored upstream body came from, and how to revalidate it."""

    upstream: str
    variant: str
    """The form the upstream actually sent."""
    content_id: str
    fetched: float
    etag: str | None = None
    last_modified: str | None = None

    def header(self) -> bytes:
        return json.dumps(
            {
                "upstream": self.upstream,
                "variant": self.variant,
                "id": self.content_id,
                "fetched": self.fetched,
                "etag": self.etag,
                "last_modified": self.last_modified,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_header(cls, raw: bytes) -> _Copy | None:
        try:
            h = json.loads(raw)
            return cls(
                upstream=str(h["upstream"]),
                variant=str(h["variant"]),
                content_id=str(h["id"]),
                fetched=float(h["fetched"]),
                etag=h.get("etag"),
                last_modified=h.get("last_modified"),
            )
        except (ValueError, KeyError, TypeError):
            return None


def _envelope(copy: _Copy, body: bytes) -> bytes:
    return copy.header() + b"\n" + body


def _open_envelope(raw: bytes) -> tuple[_Copy, bytes] | None:
    header, sep, body = bytes(raw).partition(b"\n")
    copy = _Copy.from_header(header) if sep else None
    return None if copy is None else (copy, body)


def body_blob_key(format_name: str, sha256_hex: str) -> str:
    """Where a big upstream body is stored: content-addressed like artifacts (`<format>/blobs/`),
    so the orphan sweep collects it once no `upstream_documents` row names it."""
    return f"{format_name}/blobs/sha256/{sha256_hex[:2]}/{sha256_hex}"


@dataclass(frozen=True)
class _Stored:
    """A stored copy: its body at hand, or the storage key it is kept under (read when needed)."""

    copy: _Copy
    body: bytes | None
    blob: str | None = None


@dataclass(frozen=True)
class _LastGood:
    copy: _Copy
    body: bytes | None
    """None for a body kept in storage (read only when something needs it)."""
    in_cache: bool
    """False when it came from the database, so a 304 must put the body back into the cache."""


class _UpstreamFailed(Exception):
    """One upstream could not answer (network error, timeout, 5xx, garbage).

    `reason` is short and names no host: it is what a client sees. The log gets the details."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --- the documents ----------------------------------------------------------------------------------


class UpstreamDocuments:
    """One registry's documents from its upstreams (see the module docstring).

    Built by core for a registry (`RegistryServices.upstream_documents`); formats call `get`.
    """

    def __init__(
        self,
        *,
        registry: str,
        format_name: str,
        upstreams: list[str],
        document_format: DocumentFormat,
        metadata_ttl_secs: float,
        serve_stale: bool,
        db: Database,
        cache: FailOpenCache,
        shared_cache: bool,
        http: Callable[[], aiohttp.ClientSession],
        max_document_bytes: int,
        reserved: Callable[[str], Awaitable[bool]] | None = None,
        stats: UpstreamStats | None = None,
        origins: UpstreamOrigins | None = None,
        offload: Offloader | None = None,
        memo_max_bytes: int = MEMO_MAX_BYTES,
        storage: StorageBackend | None = None,
        uses: UseLog | None = None,
    ) -> None:
        self.registry = registry
        self.format_name = format_name
        self.upstreams = [u if u.endswith("/") else u + "/" for u in upstreams]
        self.origins = origins or UpstreamOrigins(self.upstreams, registry=registry)
        self._lookups = Outcomes(lambda m: m.documents, registry, format_name)
        self.format = document_format
        self.metadata_ttl_secs = float(metadata_ttl_secs)
        self.serve_stale = serve_stale
        self.db = db
        self.cache = cache
        self.http = http
        self.max_document_bytes = max_document_bytes
        self.reserved = reserved
        self.stats = stats or UpstreamStats()
        self.metadata_timeout = METADATA_TIMEOUT
        self.writes = BackgroundWrites()
        self._flights = SingleFlight(kind="document")
        self._failed_until: dict[str, float] = {}
        self._memo: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._memo_bytes = 0
        self._extracts: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self.memo_max_bytes = memo_max_bytes
        self.offload = offload or Offloader()
        self.storage = storage
        self.uses = uses
        """Where served documents are noted, for retention's least-recently-used order."""
        """Where big bodies are kept (`STORED_BODY_MIN_BYTES`); without one, all go to the database."""
        self._headers: dict[bytes, _Copy] = {}
        self._fresh_here: OrderedDict[tuple[str, str], _Copy] = OrderedDict()
        """(requested variant, name) -> the fresh copy that answers it, until its TTL runs out."""
        self._warn_allowed = LogThrottle()
        # A per-process cache would only hold a second copy of what the memo and the database
        # already have, unbounded in bytes: bodies go into shared caches only.
        self._cache_bodies = shared_cache

    async def close(self) -> None:
        """Stop fetches that are still running (their callers get `CancelledError`), then wait
        for the durable copies written after answering."""
        await self._flights.cancel_all()
        await self.settle()
        self._memo.clear()
        self._memo_bytes = 0

    async def settle(self) -> None:
        """Wait for the database writes made after answering."""
        await self.writes.settle()

    # --- keys ---------------------------------------------------------------------------------

    def _fresh_key(self, variant: str, name: str) -> str:
        return f"{self.format_name}:up:{self.registry}:{variant}:{name}"

    def _body_key(self, variant: str, name: str) -> str:
        return f"{self._fresh_key(variant, name)}:body"

    def _absent_key(self, name: str) -> str:
        return f"{self.format_name}:up:{self.registry}:absent:{name}"

    # --- reading ------------------------------------------------------------------------------

    async def exists(self, name: str) -> bool:
        """Whether an upstream has `name` (a stale copy counts). Raises `UpstreamError` when the
        upstreams cannot tell and there is no copy."""
        return await self.get(name) is not None

    async def get(self, name: str, variant: str | None = None, *, revalidate: bool = False) -> UpstreamDocument | None:
        """The upstream document of `name`, or None when every upstream answers 404 (or the name
        is reserved for local use).

        Served from the cache while fresh, else fetched or revalidated once for all concurrent
        callers on all replicas. `revalidate=True` skips the freshness check and asks the
        upstream (conditionally). Raises `UpstreamError` when the upstreams fail and no copy may
        be served.
        """
        doc = await self._get(name, variant or self.format.default_variant, revalidate)
        if doc is not None and self.uses is not None:
            self.uses.document(name, doc.variant)
        return doc

    async def _get(self, name: str, variant: str, revalidate: bool) -> UpstreamDocument | None:
        if variant not in self.format.accept:
            raise ValueError(f"unknown document variant {variant!r}")
        self.format.path(name)  # refuse odd names before they reach a cache key or a URL
        if self.reserved is not None and await self.reserved(name):
            return None
        if not self.upstreams:
            return None
        if not revalidate:
            doc = await self._fresh(name, variant)
            if doc is not None:
                self.stats.cache_hits += 1
                self._lookups("hit")
                return doc
            if await self.cache.get(self._absent_key(name)) is not None:
                self._lookups("absent")
                return None
            if self.serve_stale and self._failed_until.get(f"{variant}:{name}", 0.0) > time.monotonic():
                last = await self._last_good(name, variant)
                if last is not None:
                    self.stats.stale_served += 1
                    self._lookups("stale")
                    return self._document(name, last.copy, last.body, stale=True)
        started = time.time()

        async def fetch() -> UpstreamDocument | None:
            return await under_lease(
                self.cache,
                f"{self.format_name}:lease:up:{self.registry}:{variant}:{name}",
                wait_secs=METADATA_WAIT_SECS,
                ready=lambda: self._fresh(name, variant, since=started if revalidate else None),
                work=lambda: self._fetch_upstreams(name, variant),
                kind="document",
            )

        try:
            found = await self._flights.run(f"{variant}:{name}", fetch)
        except BaseException:
            self._lookups("miss")  # asked, and nothing to serve
            raise
        self._lookups("stale" if found is not None and found.stale else "miss")
        return found

    async def forget(self, name: str, variant: str, *, used_before: float) -> str | bool | None:
        """Drop the stored copy of `name` in `variant` (retention evicts it), unless it was used
        or fetched since `used_before`: then False. Returns the storage key of its body, for the
        caller to delete once no process can be reading it, or None."""
        async with self.db.transaction() as conn:
            row = await conn.fetchrow(
                "SELECT body_key FROM upstream_documents"
                " WHERE registry = $1 AND name = $2 AND variant = $3 AND last_used <= $4",
                self.registry,
                name,
                variant,
                used_before,
            )
            if row is None:
                return False
            await conn.execute(
                "DELETE FROM upstream_documents WHERE registry = $1 AND name = $2 AND variant = $3",
                self.registry,
                name,
                variant,
            )
        await self.cache.invalidate(self._fresh_key(variant, name))
        await self.cache.invalidate(self._body_key(variant, name))
        dropped = self._memo.pop(self._body_key(variant, name), None)
        if dropped is not None:
            self._memo_bytes -= len(dropped[1])
        self._forget_here(name)
        body_key: str | None = row["body_key"]
        return body_key

    def _forget_here(self, name: str) -> None:
        for variant in self.format.accept:
            self._fresh_here.pop((variant, name), None)

    async def known_names(self, text: str, limit: int, exclude: set[str]) -> list[str]:
        """Names of cached upstream documents containing `text` (case-insensitive), for search."""
        if "\x00" in text:
            return []
        pattern = "%" + like_escape(text.lower()) + "%"
        rows = await self.db.fetch(
            "SELECT DISTINCT name FROM upstream_documents WHERE registry = $1 AND LOWER(name) LIKE $2 ESCAPE '\\'"
            " ORDER BY name",
            self.registry,
            pattern,
        )
        return [r["name"] for r in rows if r["name"] not in exclude][:limit]

    async def _fresh(self, name: str, variant: str, since: float | None = None) -> UpstreamDocument | None:
        """A copy whose TTL has not run out (and that was confirmed after `since`), else None.

        The answer is remembered in this process until the copy's TTL runs out, so a hot document
        costs no cache round trip per request: a newer copy another replica fetched meanwhile is
        as good as this one until then (it is what this process would serve without asking)."""
        here = self._fresh_here.get((variant, name))
        if here is not None:
            if here.fetched + self.metadata_ttl_secs > time.time() and (since is None or here.fetched >= since):
                self._fresh_here.move_to_end((variant, name))
                return self._document(name, here, self._memo_body(here.variant, name, here), stale=False)
            del self._fresh_here[(variant, name)]
        for v in self.format.stored_variants(variant):
            raw = await self.cache.get(self._fresh_key(v, name))
            copy = self._header(raw) if raw else None
            if copy is None or (since is not None and copy.fetched < since):
                continue
            # The header says the body is stored (`_store` writes it first); it is read only when
            # needed, so a fresh hit on a big document costs no read of its bytes.
            self._fresh_here[(variant, name)] = copy
            if len(self._fresh_here) > FRESH_HERE_MAX_ENTRIES:
                self._fresh_here.popitem(last=False)
            return self._document(name, copy, self._memo_body(v, name, copy), stale=False)
        return None

    def _memo_body(self, variant: str, name: str, copy: _Copy) -> bytes | None:
        memo = self._memo.get(self._body_key(variant, name))
        return memo[1] if memo is not None and memo[0] == copy.content_id else None

    async def read(self, doc: UpstreamDocument) -> bytes:
        """The body of `doc` (from memory, the cache or the database). Raises `UpstreamError` when
        no stored copy is left, which only a flushed cache and a cleared database together cause."""
        if doc.body is not None:
            return doc.body
        copy = _Copy(doc.upstream, doc.variant, doc.content_id, doc.fetched_at)
        body = await self._body_for(doc.name, doc.variant, copy)
        if body is None:
            stored = await self._db_envelope(doc.name, doc.variant)
            body = await self._body_of(stored) if stored is not None else None  # a newer copy is as good
        if body is None:
            # Evicted (retention) while this process still took its copy for fresh: fetch it anew.
            self._forget_here(doc.name)
            again = await self.get(doc.name, doc.variant, revalidate=True)
            body = again.body if again is not None else None
        if body is None:
            raise UpstreamError(f"the stored copy of package {doc.name} is gone; try again")
        return body

    def _header(self, raw: bytes) -> _Copy | None:
        """`_Copy.from_header`, remembered: a fresh header is read on every request and changes
        only when the copy is fetched or renewed."""
        copy = self._headers.get(raw)
        if copy is None:
            copy = _Copy.from_header(raw)
            if copy is not None:
                if len(self._headers) >= MEMO_MAX_ENTRIES:
                    self._headers.clear()
                self._headers[bytes(raw)] = copy
        return copy

    async def _body_for(self, name: str, variant: str, copy: _Copy) -> bytes | None:
        """The body that `copy` describes: from memory, else the cache, else the database."""
        body_key = self._body_key(variant, name)
        memo = self._memo.get(body_key)
        if memo is not None and memo[0] == copy.content_id:
            self._memo.move_to_end(body_key)
            return memo[1]
        for source in (self._cache_envelope, self._db_envelope):
            found = await source(name, variant)
            if found is not None and found.copy.content_id == copy.content_id:
                body = await self._body_of(found)
                if body is not None:
                    self._remember(body_key, copy.content_id, body)
                return body
        return None

    async def _body_of(self, stored: _Stored) -> bytes | None:
        """The body of a stored copy, read from storage if it is kept there (None if it is gone)."""
        if stored.body is not None or stored.blob is None or self.storage is None:
            return stored.body
        try:
            return b"".join([chunk async for chunk in self.storage.get(stored.blob)])
        except NotFound:
            return None
        except Exception as exc:
            if self._warn_allowed("storage-read"):
                log.warning("cannot read a stored upstream document from storage: %s", exc)
            return None

    async def _cache_envelope(self, name: str, variant: str) -> _Stored | None:
        if not self._cache_bodies:
            return None
        raw = await self.cache.get(self._body_key(variant, name), stale=True)
        opened = _open_envelope(raw) if raw else None
        return _Stored(*opened) if opened is not None else None

    async def _db_envelope(self, name: str, variant: str) -> _Stored | None:
        return (await self._db_envelopes(name, (variant,))).get(variant)

    async def _db_envelopes(self, name: str, variants: tuple[str, ...]) -> dict[str, _Stored]:
        """The stored copies of `name` in the given variants, by variant (one statement; bodies
        kept in storage are not read yet)."""
        marks = ", ".join(f"${i}" for i in range(3, 3 + len(variants)))
        try:
            rows = await self.db.fetch(
                "SELECT variant, body, body_key, etag, last_modified, fetched FROM upstream_documents"
                f" WHERE registry = $1 AND name = $2 AND variant IN ({marks})",
                self.registry,
                name,
                *variants,
            )
        except Exception as exc:
            if self._warn_allowed("db-read"):
                log.warning("cannot read stored upstream documents from the database: %s", exc)
            return {}
        found = {}
        for row in rows:
            opened = _open_envelope(row["body"])
            if opened is None:
                continue
            # A 304 renews the columns without rewriting the body: they are the current validators.
            copy = replace(
                opened[0], fetched=float(row["fetched"]), etag=row["etag"], last_modified=row["last_modified"]
            )
            blob = row["body_key"]
            found[str(row["variant"])] = _Stored(copy, None if blob else opened[1], blob)
        return found

    async def _last_good(self, name: str, variant: str) -> _LastGood | None:
        """The newest stored copy, fresh or not: what revalidation and `serve_stale` start from."""
        variants = self.format.stored_variants(variant)
        stored: dict[str, _Stored] | None = None

        async def from_db(name: str, v: str) -> _Stored | None:
            nonlocal stored
            if stored is None:  # every variant in one statement: a cold miss asks for two
                stored = await self._db_envelopes(name, variants)
            return stored.get(v)

        for v in variants:
            # The header key holds the current validators (a 304 renews only it).
            raw = await self.cache.get(self._fresh_key(v, name), stale=True)
            header = _Copy.from_header(raw) if raw else None
            body_key = self._body_key(v, name)
            memo = self._memo.get(body_key)
            if header is not None and memo is not None and memo[0] == header.content_id:
                return _LastGood(header, memo[1], in_cache=True)
            for source, in_cache in ((self._cache_envelope, True), (from_db, False)):
                found = await source(name, v)
                if found is None:
                    continue
                copy, body = found.copy, found.body
                if in_cache and header is not None and header.content_id == copy.content_id:
                    copy = header
                if body is not None:
                    self._remember(body_key, copy.content_id, body)
                return _LastGood(copy, body, in_cache)
        return None

    def _document(self, name: str, copy: _Copy, body: bytes | None, *, stale: bool) -> UpstreamDocument:
        return UpstreamDocument(
            name=name,
            body=body,
            upstream=copy.upstream,
            fetched_at=copy.fetched,
            stale=stale,
            content_id=copy.content_id,
            variant=copy.variant,
        )

    # --- fetching -----------------------------------------------------------------------------

    async def _fetch_upstreams(self, name: str, variant: str) -> UpstreamDocument | None:
        """Ask each upstream in turn; runs once per key at a time, under the lease."""
        last = await self._last_good(name, variant)
        problems: list[str] = []
        failed: list[str] = []
        for upstream in self.upstreams:
            try:
                doc = await self._fetch_one(upstream, name, variant, last)
            except _UpstreamFailed as exc:
                self.stats.failures += 1
                problems.append(f"{upstream}: {exc}")
                failed.append(f"{origin_of(upstream)} ({exc.reason})")
                continue
            if doc is not None:
                self._failed_until.pop(f"{variant}:{name}", None)
                return doc
        if not problems:
            # Every upstream said 404: believe it for a short while.
            ttl = min(NOT_FOUND_TTL_SECS, self.metadata_ttl_secs)
            if ttl > 0:
                await self.cache.set(self._absent_key(name), b"1", ttl_secs=ttl, stale_retention_secs=0)
            return None
        self._failed_until[f"{variant}:{name}"] = time.monotonic() + FAILURE_BACKOFF_SECS
        if len(self._failed_until) > 10_000:
            now = time.monotonic()
            self._failed_until = {k: t for k, t in self._failed_until.items() if t > now}
        # One line per outage and interval, however many packages it hits (an `npm ci` asks for
        # hundreds), counting the ones it stands for.
        detail = "; ".join(problems)
        if self.serve_stale and last is not None:
            self.stats.stale_served += 1
            others = self._warn_allowed.admit("stale")
            if others is not None:
                log.warning(
                    "registry %s: serving the stale copy of %s from %s (fetched %.0f s ago)%s: "
                    "the upstream registries failed: %s",
                    self.registry,
                    name,
                    last.copy.upstream,
                    time.time() - last.copy.fetched,
                    f" and {others} other stale copies since the last line" if others else "",
                    detail,
                )
            return self._document(name, last.copy, last.body, stale=True)
        others = self._warn_allowed.admit("down")
        if others is not None:
            log.warning(
                "registry %s: cannot fetch %s%s: %s",
                self.registry,
                name,
                f" (and {others} other packages since the last line)" if others else "",
                detail,
            )
        which = ", ".join(failed)
        if last is None:
            raise UpstreamError(f"package {name} is not cached, and its upstream registry failed: {which}")
        raise UpstreamError(f"the upstream registry failed for package {name}: {which}")

    async def _fetch_one(
        self, upstream: str, name: str, variant: str, last: _LastGood | None
    ) -> UpstreamDocument | None:
        """One upstream's answer: a document (200, or 304 renewing `last`), None for 404, or
        `_UpstreamFailed`."""
        headers = {"Accept": self.format.accept[variant]}
        # A copy of another variant may be revalidated too: an upstream that ignores the Accept
        # header answers 304 for it; one that serves both forms has another ETag for each.
        conditional = last is not None and last.copy.upstream == upstream
        if conditional and last is not None:
            if last.copy.etag:
                headers["If-None-Match"] = last.copy.etag
            if last.copy.last_modified:
                headers["If-Modified-Since"] = last.copy.last_modified
        url = URL(upstream + self.format.path(name), encoded=True)
        self.stats.metadata_requests += 1
        try:
            async with self.origins.request(
                self.http(), "GET", url, headers=headers, timeout=self.metadata_timeout
            ) as resp:
                if resp.status in (404, 410):
                    self.stats.not_found += 1
                    return None
                if resp.status == 304 and conditional and last is not None:
                    self.stats.not_modified += 1
                    return await self._renew(name, last, resp.headers)
                if resp.status != 200:
                    raise _UpstreamFailed(f"HTTP {resp.status}")
                body = await self._read_limited(resp)
                etag = resp.headers.get("ETag")
                last_modified = resp.headers.get("Last-Modified")
                got = self.format.variant_of(variant, resp.content_type)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _UpstreamFailed(failure_reason(exc), str(exc)) from exc
        try:
            body, digest, summary = await self.offload.run(
                len(body), checked_and_summarized, self.format.check, self.format.summarize, body
            )
        except ValueError as exc:
            raise _UpstreamFailed("the answer is not a usable document", str(exc)) from exc
        self.stats.metadata_downloads += 1
        copy = _Copy(
            upstream=upstream,
            variant=got,
            content_id=digest[:32],
            fetched=time.time(),
            etag=etag,
            last_modified=last_modified,
        )
        await self._store(name, copy, body, digest, summary)
        self._remember(self._body_key(got, name), copy.content_id, body)
        return self._document(name, copy, body, stale=False)

    async def _read_limited(self, resp: aiohttp.ClientResponse) -> bytes:
        limit = self.max_document_bytes
        if resp.content_length is not None and resp.content_length > limit:
            raise _UpstreamFailed(f"the document is larger than {limit} bytes")
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(CHUNK_SIZE):
            size += len(chunk)
            if size > limit:
                raise _UpstreamFailed(f"the document is larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _remember(self, body_key: str, content_id: str, body: bytes) -> None:
        old = self._memo.pop(body_key, None)
        if old is not None:
            self._memo_bytes -= len(old[1])
        if len(body) * 4 > self.memo_max_bytes:
            return  # one huge body must not push out everything else; the cache and database have it
        self._memo[body_key] = (content_id, body)
        self._memo_bytes += len(body)
        while self._memo and (self._memo_bytes > self.memo_max_bytes or len(self._memo) > MEMO_MAX_ENTRIES):
            _, (_, dropped) = self._memo.popitem(last=False)
            self._memo_bytes -= len(dropped)

    async def extract(self, doc: UpstreamDocument, fn: Callable[..., T], *args: Any) -> T:
        """`fn(doc.body, *args)`: what a format reads from a document (a version's manifest, the
        tags), computed once per content id and remembered; big bodies are parsed in a worker
        process (`batlehub.offload`), so the event loop never decodes them. `fn` is a pure,
        module-level function returning small, plain data; treat its answer as read-only."""
        key = (doc.content_id, fn.__module__, fn.__qualname__, *args)
        if key in self._extracts:
            self._extracts.move_to_end(key)
            found: T = self._extracts[key]
            return found
        body = await self.read(doc)
        result = await self.offload.run(len(body), fn, body, *args)
        self._extracts[key] = result
        if len(self._extracts) > EXTRACTS_MAX_ENTRIES:
            self._extracts.popitem(last=False)
        return result

    async def _store(self, name: str, copy: _Copy, body: bytes, digest: str, summary: str = "{}") -> None:
        """Keep a new body: durably (the last good copy), in the cache, then the fresh header that
        tells waiting replicas it is there.

        A big body goes to storage first, then the row naming it. Otherwise the database write
        happens after answering (awaited by `close`) when nobody needs it meanwhile: this process
        has the document in its memo, and other replicas find the body in the shared cache. A body
        too large for the shared cache (or, with a per-process cache, for the memo) is written
        first, because it will be read from the database."""
        envelope = _envelope(copy, body)
        if self.storage is not None and len(body) >= STORED_BODY_MIN_BYTES:
            blob = await self._put_body(body, digest)
            if blob is not None:
                await self._write_document(name, copy, _envelope(copy, b""), blob=blob, size=len(body), summary=summary)
                await self._cache_body(name, copy, envelope)
                await self._publish_fresh(name, copy)
                return
        write = self._write_document(name, copy, envelope, size=len(body), summary=summary)
        in_shared_cache = self._cache_bodies and len(envelope) <= CACHED_BODY_MAX_BYTES
        in_memo = len(body) * 4 <= self.memo_max_bytes
        if not in_shared_cache and (self._cache_bodies or not in_memo):
            await write  # the database is where this body will be read from
        else:
            self.writes.spawn(write)
        await self._cache_body(name, copy, envelope)
        await self._publish_fresh(name, copy)

    async def _put_body(self, body: bytes, digest: str) -> str | None:
        """Keep a big body in storage under its content key; None (the database keeps it then)
        when storage fails."""
        assert self.storage is not None
        key = body_blob_key(self.format_name, digest)

        async def chunks() -> AsyncIterator[bytes]:
            view = memoryview(body)
            for start in range(0, len(body), STORAGE_CHUNK_SIZE):
                yield bytes(view[start : start + STORAGE_CHUNK_SIZE])

        try:
            await self.storage.put(key, chunks(), expected={"sha256": digest})
        except Exception as exc:
            if self._warn_allowed("storage-write"):
                log.warning("cannot keep a big upstream document in storage (the database keeps it): %s", exc)
            return None
        return key

    async def _publish_fresh(self, name: str, copy: _Copy) -> None:
        await self.cache.invalidate(self._absent_key(name))
        await self.cache.set(
            self._fresh_key(copy.variant, name),
            copy.header(),
            ttl_secs=self.metadata_ttl_secs,
            stale_retention_secs=COPY_RETENTION_SECS,
        )

    async def _write_document(
        self, name: str, copy: _Copy, envelope: bytes, *, size: int, blob: str | None = None, summary: str = "{}"
    ) -> None:
        try:
            # Never replace a newer copy (writes that finish out of order on a pool).
            await self.db.execute(
                "INSERT INTO upstream_documents"
                " (registry, name, variant, body, body_key, size, etag, last_modified, fetched, last_used, summary)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10)"
                " ON CONFLICT (registry, name, variant) DO UPDATE SET body = excluded.body,"
                " body_key = excluded.body_key, size = excluded.size, etag = excluded.etag,"
                " last_modified = excluded.last_modified, fetched = excluded.fetched, last_used = excluded.last_used,"
                " summary = excluded.summary"
                " WHERE upstream_documents.fetched <= excluded.fetched",
                self.registry,
                name,
                copy.variant,
                envelope,
                blob,
                size,
                copy.etag,
                copy.last_modified,
                copy.fetched,
                summary,
            )
        except Exception as exc:
            if self._warn_allowed("db-write"):
                log.warning("cannot keep the upstream copy of %s in the database: %s", name, exc)

    async def _cache_body(self, name: str, copy: _Copy, envelope: bytes) -> None:
        if self._cache_bodies and len(envelope) <= CACHED_BODY_MAX_BYTES:
            await self.cache.set(
                self._body_key(copy.variant, name),
                envelope,
                ttl_secs=COPY_RETENTION_SECS,
                stale_retention_secs=COPY_RETENTION_SECS,
            )

    async def _renew(self, name: str, last: _LastGood, headers: Mapping[str, str]) -> UpstreamDocument:
        """A 304: the copy is current again; write the small header, not the body."""
        copy = replace(
            last.copy,
            fetched=time.time(),
            etag=headers.get("ETag") or last.copy.etag,
            last_modified=headers.get("Last-Modified") or last.copy.last_modified,
        )
        try:
            await self.db.execute(
                "UPDATE upstream_documents SET fetched = $1, etag = $2, last_modified = $3, last_used = $1"
                " WHERE registry = $4 AND name = $5 AND variant = $6",
                copy.fetched,
                copy.etag,
                copy.last_modified,
                self.registry,
                name,
                copy.variant,
            )
        except Exception as exc:
            if self._warn_allowed("db-write"):
                log.warning("cannot renew the upstream copy of %s in the database: %s", name, exc)
        if not last.in_cache and last.body is not None:
            await self._cache_body(name, copy, _envelope(copy, last.body))
        await self.cache.set(
            self._fresh_key(copy.variant, name),
            copy.header(),
            ttl_secs=self.metadata_ttl_secs,
            stale_retention_secs=COPY_RETENTION_SECS,
        )
        return self._document(name, copy, last.body, stale=False)

    # --- forwarding -------------------------------------------------------------------------------

    async def forward(self, path: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, str, bytes]:
        """POST `body` to `path` under the first upstream (e.g. an audit service) and return its
        status, content type and body. Raises `UpstreamError` if it cannot be reached."""
        return await self._first_upstream("POST", path, body=body, headers=headers, client_timeout=FORWARD_TIMEOUT)

    async def query(self, path: str, *, timeout_secs: float = 5.0) -> tuple[int, str, bytes]:
        """GET `path` (with its query string, already encoded) under the first upstream, e.g. a
        search; its status, content type and body (at most the document limit). Raises
        `UpstreamError` when it cannot be reached in time."""
        client_timeout = aiohttp.ClientTimeout(total=timeout_secs, connect=min(timeout_secs, 5))
        return await self._first_upstream(
            "GET", path, headers={"Accept": "application/json"}, client_timeout=client_timeout
        )

    async def _first_upstream(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str],
        client_timeout: aiohttp.ClientTimeout,
    ) -> tuple[int, str, bytes]:
        if not self.upstreams:
            raise NotFound("this registry has no upstream registry to ask")
        self.stats.forwarded += 1
        upstream = self.upstreams[0]
        try:
            async with self.origins.request(
                self.http(),
                method,
                URL(upstream + path.lstrip("/"), encoded=True),
                data=body,
                headers=dict(headers),
                timeout=client_timeout,
            ) as resp:
                answer = await self._read_limited(resp)
                return resp.status, resp.headers.get("Content-Type", "application/octet-stream"), answer
        except (aiohttp.ClientError, TimeoutError, _UpstreamFailed) as exc:
            log.warning("registry %s: %s %s failed: %s", self.registry, method, upstream, exc)
            reason = exc.reason if isinstance(exc, _UpstreamFailed) else failure_reason(exc)
            raise UpstreamError(f"the upstream registry {origin_of(upstream)} failed ({reason})") from exc


def checked_with_id(check: Callable[[bytes], bytes], body: bytes) -> tuple[bytes, str]:
    """`check(body)` and the sha256 (hex) of what it kept (both pure: run off the event loop)."""
    kept = check(body)
    return kept, hashlib.sha256(kept).hexdigest()


def checked_and_summarized(
    check: Callable[[bytes], bytes], summarize: Callable[[bytes], DocumentSummary] | None, body: bytes
) -> tuple[bytes, str, str]:
    """`checked_with_id`, and the summary a listing shows, as the JSON stored beside the copy
    (pure: run off the event loop with the check)."""
    kept, digest = checked_with_id(check, body)
    if summarize is None:
        return kept, digest, "{}"
    try:
        summary = summarize(kept)
    except Exception:  # a listing without a description is better than a failed fetch
        log.warning("summarizing an upstream document failed", exc_info=True)
        return kept, digest, "{}"
    # Bounded: a listing row, not a second copy of an upstream's README.
    row = {
        "description": summary.description[:500],
        "latest": summary.latest[:100],
        "modified": summary.modified[:40],
        "maintainers": [person[:100] for person in summary.maintainers[:20]],
    }
    return kept, digest, json.dumps(row)


async def known_packages(db: Database, registry: str, text: str = "") -> list[KnownPackage]:
    """Every name of `registry` whose upstream document the hub holds, by name, with what its
    summary says; `text` keeps those whose name or summary contains it (case-insensitive)."""
    if "\x00" in text:
        return []
    sql = "SELECT name, summary, fetched FROM upstream_documents WHERE registry = $1"
    args: list[Any] = [registry]
    if text:
        sql += " AND (LOWER(name) LIKE $2 ESCAPE '\\' OR LOWER(summary) LIKE $2 ESCAPE '\\')"
        args.append("%" + like_escape(text.lower()) + "%")
    found: dict[str, KnownPackage] = {}
    for row in await db.fetch(sql + " ORDER BY name", *args):
        try:
            summary = json.loads(row["summary"] or "{}")
        except ValueError:
            summary = {}
        if not isinstance(summary, dict):
            summary = {}
        seen = found.get(row["name"])
        # One row per variant; npm's abbreviated form has no description, its full form has.
        description = str(summary.get("description") or "") or (seen.description if seen else "")
        latest = str(summary.get("latest") or "") or (seen.latest if seen else "")
        fetched = max(float(row["fetched"]), seen.fetched if seen else 0.0)
        modified = str(summary.get("modified") or "") or (seen.modified if seen else "")
        people = summary.get("maintainers")
        maintainers = tuple(str(p) for p in people) if isinstance(people, list) and people else ()
        found[row["name"]] = KnownPackage(
            row["name"], description, latest, fetched, modified, maintainers or (seen.maintainers if seen else ())
        )
    needle = text.lower()
    # The SQL also matched the summary's JSON keys ("description" holds "desc").
    return [k for k in found.values() if needle in k.name.lower() or needle in k.description.lower()]


def like_escape(text: str) -> str:
    """`text` as a literal inside a SQL LIKE pattern with `ESCAPE '\\'`."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
