"""Proxying upstream npm registries: packuments, tarballs, audit and warm-up.

`UpstreamProxy` is what an npm registry in `proxy` or `hybrid` mode asks for anything it does not
hold itself. Its job is to ask the upstreams as rarely as possible and to keep answering when
they are down:

- A packument is asked for once per `metadata_ttl_secs`, however many clients and replicas want
  it at the same moment: one task per key in a process fetches while the others await it, and
  across replicas that task first takes a lease in the cache backend; a replica that finds the
  lease taken watches the cache for the result instead of asking the upstream too.
- An expired copy is revalidated with `If-None-Match` / `If-Modified-Since`; a 304 renews it
  without downloading the body again.
- Every good copy is kept twice: in the cache backend (shared and fast) and in the database table
  `upstream_documents` (durable), so `serve_stale` still works after a restart or a cache flush.
- Tarballs are verified against the `integrity` / `shasum` of their metadata while they stream into
  storage, and stored content-addressed (`blob_key`), so they are downloaded once, ever.

Stored copies use one small format, the "envelope": a JSON header line (upstream, validators, a
content id) followed by a newline and the upstream's body bytes exactly as received. The cache
holds the header alone under a key that is fresh for the TTL (a freshness check reads a few
hundred bytes, not the whole packument); a shared cache also holds the envelope under a second
key. The database row holds the envelope, with the validators also in their own columns. Each
process keeps the hottest documents parsed (keyed by content id), so a cache hit costs one small
read and no JSON parsing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import aiohttp
from yarl import URL

from batlehub.errors import (
    BadRequest,
    IntegrityError,
    NotFound,
    PayloadTooLarge,
    UpstreamError,
)

if TYPE_CHECKING:
    from batlehub.config import RegistrySettings
    from batlehub.interfaces import RegistryServices, StoredBlob

log = logging.getLogger(__name__)

T = TypeVar("T")

FULL = "full"
ABBREVIATED = "abbreviated"
ABBREVIATED_TYPE = "application/vnd.npm.install-v1+json"
_ACCEPT = {
    FULL: "application/json",
    ABBREVIATED: f"{ABBREVIATED_TYPE}; q=1.0, application/json; q=0.8, */*",
}

METADATA_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=5, sock_connect=5)
# A tarball may legitimately take minutes; what must not happen is a silent, stalled socket.
TARBALL_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5, sock_read=60)
AUDIT_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=5, sock_connect=5)

LEASE_TTL_SECS = 15.0
"""Short, so a replica that dies while fetching blocks the others for seconds, not minutes; the
holder keeps extending it while it works."""
LEASE_POLL_SECS = 0.05
METADATA_WAIT_SECS = 5.0
"""How long a replica waits for another one's packument fetch before asking the upstream itself."""
TARBALL_WAIT_SECS = 300.0
"""A tarball download is watched for longer: its holder extends the lease while bytes flow."""
FAILURE_BACKOFF_SECS = 10.0
"""After the upstreams failed for a package, serve its stale copy without asking them again for
this long, so an outage does not cost every request a connect timeout."""
COPY_RETENTION_SECS = 7 * 86400.0
"""How long the cache keeps a copy past its freshness (the database keeps it regardless)."""
WARNING_EVERY_SECS = 60.0
WARMED_PINNED_SECS = 7 * 86400.0
"""A warmed `name@version` never changes, so one warm-up lasts for days across replicas..."""
WARMED_LATEST_SECS = 3600.0
"""...while a warmed `name` (its latest version) is worth checking again after an hour."""
MEMO_MAX_BYTES = 16 * 1024 * 1024
"""Parsed packuments kept in memory, counted by their JSON size (the Python objects take several
times that), so hot documents are not parsed again on every request."""
MEMO_MAX_ENTRIES = 1024
CACHED_BODY_MAX_BYTES = 8 * 1024 * 1024
"""Bodies larger than this are not put into a shared cache (they would slow it down for everyone);
replicas read them from the database instead, once per change thanks to the memo."""
CHUNK_SIZE = 64 * 1024
STORED_MEMO_ENTRIES = 100_000
"""Blob keys a process remembers as stored, so a download asks neither the database nor storage."""

_HEX = re.compile(r"^[0-9a-f]+$")
_VERIFIABLE = ("sha512", "sha256", "sha1")  # what StorageBackend.put can check


# --- small pure helpers (also used by the local side of the npm registry) -----------------------


def blob_key(sha512_hex: str | None, sha1_hex: str | None) -> str:
    """The storage key of a tarball: content-addressed, so equal bytes are stored once whether they
    were published here or fetched from an upstream. sha512 when known, sha1 for old metadata."""
    if sha512_hex:
        digest = sha512_hex.lower()
        if len(digest) != 128 or not _HEX.match(digest):
            raise ValueError(f"not a sha512 hex digest: {sha512_hex!r}")
        return f"npm/blobs/sha512/{digest[:2]}/{digest}"
    if sha1_hex:
        digest = sha1_hex.lower()
        if len(digest) != 40 or not _HEX.match(digest):
            raise ValueError(f"not a sha1 hex digest: {sha1_hex!r}")
        return f"npm/blobs/sha1/{digest[:2]}/{digest}"
    raise ValueError("a blob key needs a sha512 or a sha1 digest")


def sri_to_hex(integrity: str) -> dict[str, str]:
    """Subresource Integrity (`sha512-<base64>`, possibly several space-separated, possibly with
    `?options`) to {algorithm: lowercase hex}. Malformed entries are left out, not guessed at."""
    digests: dict[str, str] = {}
    for token in (integrity or "").split():
        algorithm, sep, value = token.partition("-")
        if not sep or not value:
            continue
        value = value.split("?", 1)[0]
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
        if raw:
            digests.setdefault(algorithm.lower(), raw.hex())
    return digests


def expected_digests(name: str, version: str, dist: Mapping[str, Any]) -> dict[str, str]:
    """The digests a tarball must have according to its metadata, limited to those storage can
    check. Raises `IntegrityError` if the metadata contradicts itself."""
    expected = {a: h for a, h in sri_to_hex(str(dist.get("integrity") or "")).items() if a in _VERIFIABLE}
    shasum = str(dist.get("shasum") or "").lower()
    if len(shasum) == 40 and _HEX.match(shasum):
        if expected.setdefault("sha1", shasum) != shasum:
            raise IntegrityError(
                f"integrity check failed for {name}@{version}: its metadata announces two different sha1 digests"
            )
    return expected


def split_spec(spec: str) -> tuple[str, str | None]:
    """`name`, `name@version`, `@scope/name`, `@scope/name@version` -> (name, version or None)."""
    at = spec.rfind("@")
    if at > 0:
        return spec[:at], spec[at + 1 :] or None
    return spec, None


def upstream_path(name: str) -> str:
    """The path of a packument under an upstream base URL, `@scope%2fname` for scoped names (the
    form every npm registry understands). Refuses names that would leave that one path segment."""
    scope, slash, rest = name.partition("/")
    if name.startswith("@") and slash and rest and "/" not in rest and len(scope) > 1:
        return f"{quote(scope, safe='@')}%2f{quote(rest, safe='')}"
    if not name or "/" in name or name in (".", "..") or name.startswith("@"):
        raise BadRequest(f"invalid package name {name!r}")
    return quote(name, safe="@")


def _has_local_files(services: RegistryServices) -> bool:
    """Whether the configured storage backend has the `local_path` capability, i.e. whether
    `local_path(key) is None` means "not stored" rather than "not a local file"."""
    try:
        wanted = str(services.settings.storage.get("type", "filesystem"))
        for types in services.pm.hook.register_storage_backends():
            for kind in types:
                if kind.name == wanted:
                    return "local_path" in kind.capabilities
    except Exception:  # no plugin manager (some tests) or an odd plugin: take the general path
        return False
    return False


# --- values -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamDocument:
    """A packument from an upstream registry.

    `data` may be shared with other callers (it is kept parsed in memory): treat it as read-only.
    """

    data: dict[str, Any]
    """The packument as the upstream sent it (tarball URLs untouched)."""
    upstream: str
    """Base URL of the upstream it came from (with trailing slash)."""
    fetched_at: float
    """Epoch seconds of the last time an upstream confirmed this content (200 or 304)."""
    stale: bool
    """True when served from the last good copy because the upstreams failed."""
    content_id: str = ""
    """Changes exactly when the upstream's bytes change (not on a 304 renewal): a good key for
    anything derived from `data`, such as pre-serialized responses."""
    abbreviated: bool = False
    """True when `data` is the abbreviated form (only ever for `abbreviated=True` requests)."""


@dataclass
class UpstreamStats:
    """What this process asked the upstreams, for tests and diagnostics."""

    metadata_requests: int = 0
    """HTTP requests for packuments, whatever their answer."""
    metadata_downloads: int = 0
    """Of those, answered 200 with a body."""
    not_modified: int = 0
    """Of those, answered 304: the copy was renewed without a download."""
    not_found: int = 0
    failures: int = 0
    """Errors, timeouts and unexpected statuses."""
    tarball_downloads: int = 0
    audit_requests: int = 0
    cache_hits: int = 0
    stale_served: int = 0

    @property
    def requests(self) -> int:
        """Every HTTP request this process sent upstream."""
        return self.metadata_requests + self.tarball_downloads + self.audit_requests


@dataclass(frozen=True)
class _Copy:
    """Where one stored upstream body came from, and how to revalidate it."""

    upstream: str
    variant: str
    """The form the upstream actually sent (an abbreviated request may get the full form)."""
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


@dataclass(frozen=True)
class _LastGood:
    copy: _Copy
    data: dict[str, Any]
    body: bytes | None
    """None when it was found parsed in memory."""
    in_cache: bool
    """False when it came from the database, so a 304 must put the body back into the cache."""


class _UpstreamFailed(Exception):
    """One upstream could not answer (network error, timeout, 5xx, garbage).

    `reason` is short and names no host: it is what a client sees. The log gets the details."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _reason(exc: BaseException) -> str:
    """A short, host-free description of a failed HTTP exchange."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectionError):
        return "connection failed"
    return "bad response"


class _Throttle:
    """Says yes to a key at most once per interval, so an outage logs a line a minute, not a flood."""

    def __init__(self, every_secs: float) -> None:
        self.every_secs = every_secs
        self._last: dict[str, float] = {}

    def __call__(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -self.every_secs) < self.every_secs:
            return False
        if len(self._last) > 10_000:
            self._last = {k: t for k, t in self._last.items() if now - t < self.every_secs}
        self._last[key] = now
        return True


# --- the proxy ----------------------------------------------------------------------------------


class UpstreamProxy:
    """Everything one npm registry fetches from its upstreams; see the module docstring."""

    def __init__(
        self,
        registry: RegistrySettings,
        services: RegistryServices,
        *,
        upstreams: list[str],
        metadata_ttl_secs: float,
        serve_stale: bool,
        warm_packages: list[str],
    ) -> None:
        self.registry = registry.name
        self.services = services
        self.upstreams = [u if u.endswith("/") else u + "/" for u in upstreams]
        self.metadata_ttl_secs = float(metadata_ttl_secs)
        self.serve_stale = serve_stale
        self.warm_packages = list(warm_packages)
        self.stats = UpstreamStats()
        self.metadata_timeout = METADATA_TIMEOUT
        self.tarball_timeout = TARBALL_TIMEOUT
        self.audit_timeout = AUDIT_TIMEOUT
        self._inflight: dict[str, asyncio.Task[Any]] = {}
        self._failed_until: dict[str, float] = {}
        self._memo: OrderedDict[str, tuple[str, dict[str, Any], int]] = OrderedDict()
        self._memo_bytes = 0
        # Blob keys found stored. Blobs are content-addressed, so a key's bytes never change; a
        # blob that is deleted later (sweep) is reported back through `forget_blob`.
        self._stored: set[str] = set()
        self._headers: dict[bytes, _Copy] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self._local_files = _has_local_files(services)
        self._warn_allowed = _Throttle(WARNING_EVERY_SECS)
        # A per-process cache would only hold a second copy of what the memo and the database
        # already have, unbounded in bytes: bodies go into shared caches only.
        self._cache_bodies = str(services.settings.cache.get("type", "memory")) != "memory"

    async def close(self) -> None:
        """Stop fetches that are still running (their callers get `CancelledError`)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.settle()  # durable copies written after answering land before the database closes
        self._memo.clear()
        self._memo_bytes = 0

    # --- keys -----------------------------------------------------------------------------------

    def _fresh_key(self, variant: str, name: str) -> str:
        return f"npm:up:{self.registry}:{variant}:{name}"

    def _body_key(self, variant: str, name: str) -> str:
        return f"npm:up:{self.registry}:{variant}:{name}:body"

    # --- packuments -----------------------------------------------------------------------------

    async def packument(
        self, name: str, *, abbreviated: bool = False, revalidate: bool = False
    ) -> UpstreamDocument | None:
        """The upstream packument of `name`, or None when every upstream answers 404.

        Served from the cache while fresh (a full copy also answers an abbreviated request),
        else fetched or revalidated once for all concurrent callers on all replicas.
        `revalidate=True` skips the freshness check and asks the upstream (conditionally).
        Raises `UpstreamError` when the upstreams fail and no copy may be served.
        """
        variant = ABBREVIATED if abbreviated else FULL
        upstream_path(name)  # refuse odd names before they reach a cache key or a URL
        if not revalidate:
            doc = await self._fresh(name, variant)
            if doc is not None:
                self.stats.cache_hits += 1
                return doc
            if self.serve_stale and self._failed_until.get(f"{variant}:{name}", 0.0) > time.monotonic():
                last = await self._last_good(name, variant)
                if last is not None:
                    self.stats.stale_served += 1
                    return self._document(last.copy, last.data, stale=True)
        started = time.time()

        async def fetch() -> UpstreamDocument | None:
            return await self._under_lease(
                f"npm:lease:up:{self.registry}:{variant}:{name}",
                wait_secs=METADATA_WAIT_SECS,
                ready=lambda: self._fresh(name, variant, since=started if revalidate else None),
                work=lambda: self._fetch_upstreams(name, variant),
            )

        return await self._single_flight(f"meta:{variant}:{name}", fetch)

    def _variants(self, variant: str) -> tuple[str, ...]:
        # Whatever the full form says, the abbreviated one says too.
        return (ABBREVIATED, FULL) if variant == ABBREVIATED else (FULL,)

    async def _fresh(self, name: str, variant: str, since: float | None = None) -> UpstreamDocument | None:
        """A copy whose TTL has not run out (and that was confirmed after `since`), else None."""
        for v in self._variants(variant):
            raw = await self._cache_get(self._fresh_key(v, name))
            copy = self._header(raw) if raw else None
            if copy is None or (since is not None and copy.fetched < since):
                continue
            data = await self._data_for(name, v, copy)
            if data is not None:
                return self._document(copy, data, stale=False)
        return None

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

    async def _data_for(self, name: str, variant: str, copy: _Copy) -> dict[str, Any] | None:
        """The parsed body that `copy` describes: from memory, else the cache, else the database."""
        body_key = self._body_key(variant, name)
        memo = self._memo.get(body_key)
        if memo is not None and memo[0] == copy.content_id:
            self._memo.move_to_end(body_key)
            return memo[1]
        for source in (self._cache_envelope, self._db_envelope):
            found = await source(name, variant)
            if found is not None and found[0].content_id == copy.content_id:
                return self._parse_and_remember(body_key, copy.content_id, found[1])
        return None

    async def _cache_envelope(self, name: str, variant: str) -> tuple[_Copy, bytes] | None:
        if not self._cache_bodies:
            return None
        raw = await self._cache_get(self._body_key(variant, name), stale=True)
        return _open_envelope(raw) if raw else None

    async def _db_envelope(self, name: str, variant: str) -> tuple[_Copy, bytes] | None:
        return (await self._db_envelopes(name, (variant,))).get(variant)

    async def _db_envelopes(self, name: str, variants: tuple[str, ...]) -> dict[str, tuple[_Copy, bytes]]:
        """The stored copies of `name` in the given variants, by variant (one statement)."""
        marks = ", ".join(f"${i}" for i in range(3, 3 + len(variants)))
        try:
            rows = await self.services.db.fetch(
                "SELECT variant, body, etag, last_modified, fetched FROM upstream_documents"
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
            found[str(row["variant"])] = (copy, opened[1])
        return found

    def _parse_and_remember(self, body_key: str, content_id: str, body: bytes) -> dict[str, Any] | None:
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        self._remember(body_key, content_id, data, len(body))
        return data

    async def _last_good(self, name: str, variant: str) -> _LastGood | None:
        """The newest stored copy, fresh or not: what revalidation and `serve_stale` start from."""
        variants = self._variants(variant)
        stored: dict[str, tuple[_Copy, bytes]] | None = None

        async def from_db(name: str, v: str) -> tuple[_Copy, bytes] | None:
            nonlocal stored
            if stored is None:  # every variant in one statement: a cold miss asks for two
                stored = await self._db_envelopes(name, variants)
            return stored.get(v)

        for v in variants:
            # The header key holds the current validators (a 304 renews only it).
            raw = await self._cache_get(self._fresh_key(v, name), stale=True)
            header = _Copy.from_header(raw) if raw else None
            body_key = self._body_key(v, name)
            memo = self._memo.get(body_key)
            if header is not None and memo is not None and memo[0] == header.content_id:
                return _LastGood(header, memo[1], None, in_cache=True)
            for source, in_cache in ((self._cache_envelope, True), (from_db, False)):
                found = await source(name, v)
                if found is None:
                    continue
                copy, body = found
                if in_cache and header is not None and header.content_id == copy.content_id:
                    copy = header
                data = self._parse_and_remember(body_key, copy.content_id, body)
                if data is not None:
                    return _LastGood(copy, data, body, in_cache)
        return None

    def _document(self, copy: _Copy, data: dict[str, Any], *, stale: bool) -> UpstreamDocument:
        return UpstreamDocument(
            data=data,
            upstream=copy.upstream,
            fetched_at=copy.fetched,
            stale=stale,
            content_id=copy.content_id,
            abbreviated=copy.variant == ABBREVIATED,
        )

    async def _fetch_upstreams(self, name: str, variant: str) -> UpstreamDocument | None:
        """Ask each upstream in turn; runs once per key at a time, under the lease."""
        last = await self._last_good(name, variant)
        problems: list[str] = []
        reasons: list[str] = []
        for upstream in self.upstreams:
            try:
                doc = await self._fetch_one(upstream, name, variant, last)
            except _UpstreamFailed as exc:
                self.stats.failures += 1
                problems.append(f"{upstream}: {exc}")
                if exc.reason not in reasons:
                    reasons.append(exc.reason)
                continue
            if doc is not None:
                self._failed_until.pop(f"{variant}:{name}", None)
                return doc
        if not problems:
            return None  # every upstream said 404 (or there are none)
        self._failed_until[f"{variant}:{name}"] = time.monotonic() + FAILURE_BACKOFF_SECS
        if len(self._failed_until) > 10_000:
            now = time.monotonic()
            self._failed_until = {k: t for k, t in self._failed_until.items() if t > now}
        detail = "; ".join(problems)
        if self.serve_stale and last is not None:
            self.stats.stale_served += 1
            if self._warn_allowed(f"stale:{name}"):
                log.warning(
                    "registry %s: serving the stale copy of %s from %s (fetched %.0f s ago): "
                    "the upstream registries failed: %s",
                    self.registry,
                    name,
                    last.copy.upstream,
                    time.time() - last.copy.fetched,
                    detail,
                )
            return self._document(last.copy, last.data, stale=True)
        if self._warn_allowed(f"down:{name}"):
            log.warning("registry %s: cannot fetch %s: %s", self.registry, name, detail)
        # Clients get the kind of failure, not the upstream's address: that stays in the log.
        why = ", ".join(reasons)
        if last is None:
            raise UpstreamError(f"package {name} is not cached and the upstream registry is unavailable ({why})")
        raise UpstreamError(f"upstream registry unavailable for package {name} ({why})")

    async def _fetch_one(
        self, upstream: str, name: str, variant: str, last: _LastGood | None
    ) -> UpstreamDocument | None:
        """One upstream's answer: a document (200, or 304 renewing `last`), None for 404, or
        `_UpstreamFailed`."""
        headers = {"Accept": _ACCEPT[variant]}
        # A full copy may be revalidated by an abbreviated request too: an upstream that ignores the
        # Accept header answers 304 for it (renewing the full copy, which answers abbreviated
        # requests anyway); one that serves both forms has another ETag for each and answers 200.
        conditional = last is not None and last.copy.upstream == upstream
        if conditional and last is not None:
            if last.copy.etag:
                headers["If-None-Match"] = last.copy.etag
            if last.copy.last_modified:
                headers["If-Modified-Since"] = last.copy.last_modified
        url = URL(upstream + upstream_path(name), encoded=True)
        self.stats.metadata_requests += 1
        try:
            async with self.services.http().get(url, headers=headers, timeout=self.metadata_timeout) as resp:
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
                got = ABBREVIATED if resp.content_type == ABBREVIATED_TYPE else FULL
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _UpstreamFailed(_reason(exc), str(exc)) from exc
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise _UpstreamFailed("the answer is not JSON") from exc
        if not isinstance(data, dict) or not isinstance(data.get("versions", {}), dict):
            raise _UpstreamFailed("the answer is not a packument")
        self.stats.metadata_downloads += 1
        copy = _Copy(
            upstream=upstream,
            variant=got,
            content_id=hashlib.sha256(body).hexdigest()[:32],
            fetched=time.time(),
            etag=etag,
            last_modified=last_modified,
        )
        await self._store(name, copy, body)
        self._remember(self._body_key(got, name), copy.content_id, data, len(body))
        return self._document(copy, data, stale=False)

    async def _read_limited(self, resp: aiohttp.ClientResponse) -> bytes:
        limit = self.services.settings.limits.max_artifact_size_bytes
        if resp.content_length is not None and resp.content_length > limit:
            raise _UpstreamFailed(f"the document is larger than {limit} bytes")
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(CHUNK_SIZE):
            size += len(chunk)
            if size > limit:
                raise _UpstreamFailed(f"the document is larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _remember(self, body_key: str, content_id: str, data: dict[str, Any], size: int) -> None:
        old = self._memo.pop(body_key, None)
        if old is not None:
            self._memo_bytes -= old[2]
        self._memo[body_key] = (content_id, data, size)
        self._memo_bytes += size
        while self._memo and (self._memo_bytes > MEMO_MAX_BYTES or len(self._memo) > MEMO_MAX_ENTRIES):
            _, (_, _, dropped) = self._memo.popitem(last=False)
            self._memo_bytes -= dropped

    async def _store(self, name: str, copy: _Copy, body: bytes) -> None:
        """Keep a new body: in the database (the durable last good copy), the cache body, then
        the fresh header that tells waiting replicas it is there.

        The database write happens after answering (a background task, awaited by `close`) when
        nobody needs it meanwhile: this process has the document in its memo, and other replicas
        find the body in the shared cache. Only a body too large for the shared cache is written
        first, because other replicas read it from the database."""
        envelope = _envelope(copy, body)
        write = self._write_document(name, copy, envelope)
        if self._cache_bodies and len(envelope) > CACHED_BODY_MAX_BYTES:
            await write
        else:
            self._background(write)
        await self._cache_body(name, copy, envelope)
        await self._cache_set(self._fresh_key(copy.variant, name), copy.header(), ttl=self.metadata_ttl_secs)

    async def _write_document(self, name: str, copy: _Copy, envelope: bytes) -> None:
        try:
            # Never replace a newer copy (writes that finish out of order on a pool).
            await self.services.db.execute(
                "INSERT INTO upstream_documents (registry, name, variant, body, etag, last_modified, fetched)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (registry, name, variant) DO UPDATE SET body = excluded.body,"
                " etag = excluded.etag, last_modified = excluded.last_modified, fetched = excluded.fetched"
                " WHERE upstream_documents.fetched <= excluded.fetched",
                self.registry,
                name,
                copy.variant,
                envelope,
                copy.etag,
                copy.last_modified,
                copy.fetched,
            )
        except Exception as exc:
            if self._warn_allowed("db-write"):
                log.warning("cannot keep the upstream copy of %s in the database: %s", name, exc)

    async def _cache_body(self, name: str, copy: _Copy, envelope: bytes) -> None:
        if self._cache_bodies and len(envelope) <= CACHED_BODY_MAX_BYTES:
            await self._cache_set(self._body_key(copy.variant, name), envelope, ttl=COPY_RETENTION_SECS)

    async def _renew(self, name: str, last: _LastGood, headers: Mapping[str, str]) -> UpstreamDocument:
        """A 304: the copy is current again; write the small header, not the body."""
        copy = replace(
            last.copy,
            fetched=time.time(),
            etag=headers.get("ETag") or last.copy.etag,
            last_modified=headers.get("Last-Modified") or last.copy.last_modified,
        )
        try:
            await self.services.db.execute(
                "UPDATE upstream_documents SET fetched = $1, etag = $2, last_modified = $3"
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
        await self._cache_set(self._fresh_key(copy.variant, name), copy.header(), ttl=self.metadata_ttl_secs)
        return self._document(copy, last.data, stale=False)

    # --- tarballs -------------------------------------------------------------------------------

    async def tarball(self, name: str, version: str, dist: Mapping[str, Any]) -> str:
        """The storage key of the verified tarball of `name@version`, downloading it from
        `dist["tarball"]` first if it is not stored yet (once for all callers and replicas).

        Raises `IntegrityError` (nothing stored) when the bytes do not match the metadata's
        `integrity`/`shasum`, or when the metadata gives no digest to check against.
        """
        expected = expected_digests(name, version, dist)
        if "sha512" not in expected and "sha1" not in expected:
            raise IntegrityError(
                f"cannot verify {name}@{version}: its upstream metadata has no sha512 integrity or sha1 shasum"
            )
        key = blob_key(expected.get("sha512"), expected.get("sha1"))
        if key in self._stored:
            return key
        if await self._blob_ready(key):
            self._remember_stored(key)
            return key
        url = str(dist.get("tarball") or "")
        if not url.startswith(("http://", "https://")):
            raise UpstreamError(f"the upstream metadata of {name}@{version} has no usable tarball URL")

        async def ready() -> str | None:
            return key if await self._blob_ready(key) else None

        async def fetch() -> str:
            return await self._under_lease(
                f"npm:lease:blob:{key}",
                wait_secs=TARBALL_WAIT_SECS,
                ready=ready,
                work=lambda: self._download(name, version, url, key, expected),
                checked=True,
            )

        key = await self._single_flight(f"blob:{key}", fetch)
        self._remember_stored(key)
        return key

    def _remember_stored(self, key: str) -> None:
        if len(self._stored) >= STORED_MEMO_ENTRIES:
            self._stored.clear()
        self._stored.add(key)

    def forget_blob(self, key: str) -> None:
        """The blob under `key` turned out to be missing from storage (the orphan sweep deletes
        blobs whose rows are gone): the next `tarball` call checks again and fetches it anew."""
        self._stored.discard(key)

    async def _blob_ready(self, key: str) -> bool:
        """Stored and recorded. With local files the file is looked at first (one `lstat`, no
        thread), so a miss costs no database statement: a cold install misses on every tarball,
        and on SQLite every statement waits its turn for the one connection."""
        if self._local_files:
            if self.services.storage.local_path(key) is None:
                return False
            return await self.services.db.fetchrow("SELECT size FROM artifacts WHERE storage_key = $1", key) is not None
        row = await self.services.db.fetchrow("SELECT size FROM artifacts WHERE storage_key = $1", key)
        return row is not None and await self.services.storage.stat(key) is not None

    async def _download(self, name: str, version: str, url: str, key: str, expected: dict[str, str]) -> str:
        limit = self.services.settings.limits.max_artifact_size_bytes
        self.stats.tarball_downloads += 1
        try:
            async with self.services.http().get(
                url,
                # The digests are of the bytes as published: never let a transfer encoding change them.
                headers={"Accept": "application/octet-stream", "Accept-Encoding": "identity"},
                timeout=self.tarball_timeout,
                auto_decompress=False,
            ) as resp:
                if resp.status in (404, 410):
                    raise NotFound(f"the tarball of {name}@{version} is not on the upstream registry")
                if resp.status != 200:
                    raise UpstreamError(
                        f"upstream registry answered HTTP {resp.status} for the tarball of {name}@{version}"
                    )
                if resp.content_length is not None and resp.content_length > limit:
                    raise PayloadTooLarge(f"the tarball of {name}@{version} is larger than the limit of {limit} bytes")
                try:
                    blob = await self.services.storage.put(
                        key, resp.content.iter_chunked(CHUNK_SIZE), max_size=limit, expected=expected
                    )
                except IntegrityError as exc:
                    log.warning(
                        "registry %s: refused the tarball of %s@%s from %s: %s",
                        self.registry,
                        name,
                        version,
                        url,
                        exc,
                    )
                    raise IntegrityError(
                        f"integrity check failed for {name}@{version}: upstream bytes do not match "
                        f"the {'/'.join(sorted(expected))} digest its metadata announces; nothing was stored"
                    ) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("registry %s: cannot fetch %s: %s", self.registry, url, exc)
            raise UpstreamError(
                f"cannot fetch the tarball of {name}@{version} from the upstream registry ({_reason(exc)})"
            ) from exc
        # The row is written after answering (awaited by `close`): until the sweep's grace period
        # has passed, a fresh blob is safe without it, and this process remembers the key as
        # stored. If the write fails, the sweep may collect the blob later; it is fetched again.
        self._background(self._record(key, blob))
        log.info("registry %s: stored %s@%s (%d bytes) from %s", self.registry, name, version, blob.size, url)
        return key

    async def _record(self, key: str, blob: StoredBlob) -> None:
        try:
            await self.services.db.execute(
                "INSERT INTO artifacts (storage_key, size, sha512, sha1, created) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (storage_key) DO NOTHING",
                key,
                blob.size,
                blob.sha512,
                blob.sha1,
                time.time(),
            )
        except Exception as exc:
            self.forget_blob(key)
            if self._warn_allowed("db-write"):
                log.warning("registry %s: cannot record the stored blob %s: %s", self.registry, key, exc)

    async def settle(self) -> None:
        """Wait for the database writes made after answering (artifact rows, durable copies)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    def _background(self, work: Awaitable[None]) -> None:
        """Run a write after answering; `close` waits for the ones still running."""
        task = asyncio.ensure_future(work)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    # --- audit ----------------------------------------------------------------------------------

    async def audit(self, path: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
        """Forward an npm audit request (`-/npm/v1/security/...`) to the first upstream as is and
        return its status, content type and body. Raises `UpstreamError` if it cannot be reached."""
        path = path.lstrip("/")
        if not path.startswith("-/npm/v1/security/"):
            raise NotFound(f"not an audit endpoint: /{path}")
        if not self.upstreams:
            raise NotFound("audit is not available: this registry has no upstream registry")
        forwarded = {k: v for k, v in headers.items() if k.lower() in ("content-type", "content-encoding")}
        forwarded.setdefault("Accept", "application/json")
        self.stats.audit_requests += 1
        try:
            async with self.services.http().post(
                URL(self.upstreams[0] + path, encoded=True),
                data=body,
                headers=forwarded,
                timeout=self.audit_timeout,
            ) as resp:
                answer = await resp.read()
                # The body was decompressed on the way in: pass on its type, not its old encoding.
                out = {"Content-Type": resp.headers.get("Content-Type", "application/json")}
                return resp.status, out, answer
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("registry %s: audit request to %s failed: %s", self.registry, self.upstreams[0], exc)
            raise UpstreamError(f"upstream registry unavailable for audit ({_reason(exc)})") from exc

    # --- warm-up --------------------------------------------------------------------------------

    async def warm(self) -> None:
        """Fetch each `warm_packages` entry (packument + tarball) once across all replicas.

        Meant to run in the background after start; logs progress and problems, never raises for
        them. A replica that finds another one warming a package leaves it to that one.
        """
        total = len(self.warm_packages)
        for index, spec in enumerate(self.warm_packages, 1):
            try:
                await self._warm_one(index, total, spec)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("warm-up %d/%d: %s failed: %s", index, total, spec, exc)
        if total:
            log.info("registry %s: warm-up done (%d packages)", self.registry, total)

    async def _warm_one(self, index: int, total: int, spec: str) -> None:
        name, wanted = split_spec(spec)
        marker = f"npm:warmed:{self.registry}:{spec}"
        if await self._cache_get(marker):
            log.info("warm-up %d/%d: %s already warm", index, total, spec)
            return
        owner = uuid.uuid4().hex
        lease = f"npm:lease:warm:{self.registry}:{spec}"
        if not await self._try_lease(lease, owner):
            log.info("warm-up %d/%d: %s is being warmed by another replica", index, total, spec)
            return
        try:
            doc = await self.packument(name)
            if doc is None:
                log.warning("warm-up %d/%d: %s is not on any upstream registry", index, total, name)
                return
            tags = doc.data.get("dist-tags") or {}
            version = tags.get(wanted or "latest", wanted)
            manifest = (doc.data.get("versions") or {}).get(version) if isinstance(version, str) else None
            if (
                not isinstance(version, str)
                or not isinstance(manifest, dict)
                or not isinstance(manifest.get("dist"), dict)
            ):
                log.warning("warm-up %d/%d: %s has no version %s upstream", index, total, name, wanted or "latest")
                return
            await self.tarball(name, version, manifest["dist"])
            ttl = WARMED_PINNED_SECS if wanted and wanted not in tags else WARMED_LATEST_SECS
            await self._cache_set(marker, version.encode(), ttl=ttl)
            log.info("warm-up %d/%d: %s@%s", index, total, name, version)
        finally:
            await self._release_lease(lease, owner)

    # --- single flight --------------------------------------------------------------------------

    async def _single_flight(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        """Run `work` once per key in this process; concurrent callers share its result. A caller
        that goes away (client disconnect) does not cancel the work for the others."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._inflight[key] = task

            def done(t: asyncio.Task[Any]) -> None:
                if self._inflight.get(key) is t:
                    del self._inflight[key]
                if not t.cancelled():
                    t.exception()  # retrieved here, so an unawaited failure is not logged twice

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _under_lease(
        self,
        lease_key: str,
        *,
        wait_secs: float,
        ready: Callable[[], Awaitable[T | None]],
        work: Callable[[], Awaitable[T]],
        checked: bool = False,
    ) -> T:
        """Across replicas: do `work` while holding the lease, or, while someone else holds it,
        watch `ready()` for their result; after `wait_secs` of waiting, do the work anyway.

        `checked`: the caller has just found `ready()` empty, so a lease taken at the first try
        needs no second look (at worst another replica finished in between, and the work is done
        twice with the same result)."""
        owner = uuid.uuid4().hex
        deadline = time.monotonic() + wait_secs
        held = await self._try_lease(lease_key, owner)
        contended = not held
        while not held:
            await asyncio.sleep(LEASE_POLL_SECS)
            result = await ready()
            if result is not None:
                return result
            if time.monotonic() >= deadline:
                log.info("waited %.0f s for another replica to fetch %s; fetching it here", wait_secs, lease_key)
                break
            held = await self._try_lease(lease_key, owner)
        keeper = asyncio.create_task(self._keep_lease(lease_key, owner)) if held else None
        try:
            if contended or not checked:
                # Another replica may have finished just before the lease was ours.
                result = await ready()
                if result is not None:
                    return result
            return await work()
        finally:
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
                await self._release_lease(lease_key, owner)

    async def _keep_lease(self, lease_key: str, owner: str) -> None:
        while True:
            await asyncio.sleep(LEASE_TTL_SECS / 3)
            try:
                await self.services.cache.extend_lease(lease_key, owner, LEASE_TTL_SECS)
            except Exception as exc:
                if self._warn_allowed("cache"):
                    log.warning("cache backend failed (%s); going on without it", exc)

    # --- the cache backend, whose failures never fail a request ----------------------------------

    async def _try_lease(self, key: str, owner: str) -> bool:
        try:
            return bool(await self.services.cache.acquire_lease(key, owner, LEASE_TTL_SECS))
        except Exception as exc:
            if self._warn_allowed("cache"):
                log.warning("cache backend failed (%s); going on without it", exc)
            return True

    async def _release_lease(self, key: str, owner: str) -> None:
        try:
            await self.services.cache.release_lease(key, owner)
        except Exception as exc:
            if self._warn_allowed("cache"):
                log.warning("cache backend failed (%s); going on without it", exc)

    async def _cache_get(self, key: str, *, stale: bool = False) -> bytes | None:
        try:
            cache = self.services.cache
            return await (cache.get_stale(key) if stale else cache.get(key))
        except Exception as exc:
            if self._warn_allowed("cache"):
                log.warning("cache backend failed (%s); going on without it", exc)
            return None

    async def _cache_set(self, key: str, value: bytes, *, ttl: float) -> None:
        try:
            await self.services.cache.set(key, value, ttl_secs=ttl, stale_retention_secs=COPY_RETENTION_SECS)
        except Exception as exc:
            if self._warn_allowed("cache"):
                log.warning("cache backend failed (%s); going on without it", exc)


__all__ = [
    "UpstreamDocument",
    "UpstreamProxy",
    "UpstreamStats",
    "blob_key",
    "expected_digests",
    "split_spec",
    "sri_to_hex",
    "upstream_path",
]
