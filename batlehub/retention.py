"""Retention for proxied content: what a registry fetched from its upstreams is kept within a size
cap and/or an idle time (`[registries.retention]`), least recently used out first.

Only what an upstream can give again is evicted. Before anything goes, its upstream is asked
(`HEAD`) whether it still has it: a version the upstream has pulled keeps its last copy here, and
an upstream that does not answer stops the run, so an outage never costs the copies that bridge
it. Local (published) packages are never touched: only `cached_artifacts` claims (made when a
proxied artifact is fetched) and `upstream_documents` rows are candidates.

Artifacts are stored once per content and may be shared: a registry's eviction removes its claim,
and the blob goes only when no claim, no local file and no document names it any more. The blob is
deleted `DELETE_GRACE_SECS` after its rows, once every process's memory of it as stored has
expired (`batlehub.artifacts.STORED_MEMO_SECS`), so no replica serves or redirects to a blob that
has just gone; one fetched again meanwhile is kept.

Uses are remembered in memory and written in batches (`UseLog`), at most once per item per
`USE_PRECISION_SECS` (a later use waits for the next write, it is never dropped), at no cost per
request. The replica that runs retention writes all it has first, so what it served a moment ago is
never taken for idle; another replica's uses reach the database within `USE_FLUSH_SECS +
USE_PRECISION_SECS`.
One replica runs retention at a time (a lease in the cache backend), every `RUN_EVERY_SECS`, and
an admin may run it (or a dry run) at once through the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from yarl import URL

from batlehub import appkeys, metrics
from batlehub.artifacts import STORED_MEMO_SECS, is_referenced
from batlehub.coordination import BackgroundWrites
from batlehub.outbound import UpstreamOrigins
from batlehub.requests import rfc3339

if TYPE_CHECKING:
    from batlehub.config import RetentionSettings
    from batlehub.db import Database
    from batlehub.interfaces import CacheBackend, StorageBackend
    from batlehub.upstream import UpstreamDocuments

log = logging.getLogger(__name__)

USE_FLUSH_SECS = 20.0
USE_PRECISION_SECS = 60.0
"""A use of an item is written at most this often; one in between waits for the next write."""
USE_BATCH = 100
"""Statements per transaction when writing uses: SQLite's one connection is never held long."""
RUN_EVERY_SECS = 600.0
FIRST_RUN_SECS = 120.0
DELETE_GRACE_SECS = 2 * STORED_MEMO_SECS + 1
LEASE_TTL_SECS = 1800.0
CHECKS_AT_ONCE = 8
UNREACHABLE_STOP = 5
"""Consecutive failed checks that stop a run: the upstream is down, keep everything."""
CHECK_TIMEOUT = aiohttp.ClientTimeout(total=15, connect=5, sock_connect=5)
LISTED_MAX = 1000
"""Entries a report lists by name (its counts and byte totals cover everything)."""
REPORT_TTL_SECS = 30 * 86400.0


class UseLog:
    """What one registry served from its proxied content, written to the database in batches."""

    def __init__(self, db: Database, registry: str) -> None:
        self.db = db
        self.registry = registry
        self._artifacts: dict[str, tuple[float, str, str]] = {}
        self._documents: dict[tuple[str, str], float] = {}
        self._written: dict[object, float] = {}

    def artifact(self, key: str, url: str, what: str) -> None:
        self._artifacts[key] = (time.time(), url, what)

    def document(self, name: str, variant: str) -> None:
        self._documents[(name, variant)] = time.time()

    async def flush(self, *, everything: bool = False) -> None:
        """Write the uses seen since the last flush. One of an item written less than
        `USE_PRECISION_SECS` ago stays pending for a later flush, unless `everything` (before a
        retention run)."""
        now = time.time()
        if len(self._written) > 200_000:
            self._written = {k: t for k, t in self._written.items() if now - t < USE_PRECISION_SECS}

        def due(key: object) -> bool:
            if everything or now - self._written.get(key, 0.0) >= USE_PRECISION_SECS:
                self._written[key] = now
                return True
            return False

        artifacts = {k: v for k, v in self._artifacts.items() if due(k)}
        documents = {k: v for k, v in self._documents.items() if due(k)}
        for artifact in artifacts:
            del self._artifacts[artifact]
        for document in documents:
            del self._documents[document]
        statements: list[tuple[str, tuple[Any, ...]]] = []
        for key, (used, url, what) in artifacts.items():
            # The claim exists once the download is recorded; before that, it is made here from
            # the `artifacts` row (an artifact another registry fetched, or fetched before retention).
            statements.append(
                (
                    "INSERT INTO cached_artifacts (registry, storage_key, url, what, size, fetched, last_used)"
                    " SELECT $1, storage_key, $3, $4, size, created, $5 FROM artifacts WHERE storage_key = $2"
                    " ON CONFLICT (registry, storage_key) DO UPDATE SET last_used = excluded.last_used"
                    " WHERE cached_artifacts.last_used < excluded.last_used",
                    (self.registry, key, url, what, used),
                )
            )
        for (name, variant), used in documents.items():
            statements.append(
                (
                    "UPDATE upstream_documents SET last_used = $1"
                    " WHERE registry = $2 AND name = $3 AND variant = $4 AND last_used < $1",
                    (used, self.registry, name, variant),
                )
            )
        for start in range(0, len(statements), USE_BATCH):
            async with self.db.transaction() as conn:
                for sql, args in statements[start : start + USE_BATCH]:
                    await conn.execute(sql, *args)


@dataclass
class Candidate:
    kind: str
    """"artifact" or "document"."""
    key: str
    """The storage key of an artifact; the package name of a document."""
    size: int
    last_used: float
    what: str = ""
    url: str = ""
    variant: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "what": self.what or self.key,
            "size": self.size,
            "last_used": rfc3339(self.last_used),
        }


@dataclass
class RetentionReport:
    registry: str
    dry_run: bool
    started: float
    finished: float = 0.0
    max_bytes: int = 0
    max_idle_days: float = 0.0
    bytes_before: int = 0
    bytes_after: int = 0
    evicted_count: int = 0
    reclaimed_bytes: int = 0
    evicted: list[dict[str, Any]] = field(default_factory=list)
    kept_not_upstream: list[dict[str, Any]] = field(default_factory=list)
    """Kept because their upstream no longer has them: the last copy."""
    kept_unchecked: int = 0
    """Kept because their upstream could not be asked."""
    stopped: str = ""
    """Why the run ended early (an unreachable upstream), if it did."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["started"] = rfc3339(self.started)
        out["finished"] = rfc3339(self.finished) if self.finished else None
        return out

    def summary(self) -> str:
        verb = "would evict" if self.dry_run else "evicted"
        parts = [f"{verb} {self.evicted_count} item(s)", f"reclaiming {_size(self.reclaimed_bytes)}"]
        cap = f" of {_size(self.max_bytes)}" if self.max_bytes else ""
        parts.append(f"{_size(self.bytes_after)}{cap} in use")
        if self.kept_not_upstream:
            parts.append(f"kept {len(self.kept_not_upstream)} the upstream no longer has")
        if self.stopped:
            parts.append(f"stopped early: {self.stopped}")
        return ", ".join(parts)


class Retention:
    """Evicts one registry's proxied content per its `[registries.retention]` settings."""

    def __init__(
        self,
        *,
        registry: str,
        settings: RetentionSettings,
        db: Database,
        storage: StorageBackend,
        cache: CacheBackend,
        documents: Callable[[], Sequence[UpstreamDocuments]],
        origins: UpstreamOrigins,
        http: Callable[[], aiohttp.ClientSession],
        forget_artifact: Callable[[str], None],
        uses: UseLog | None = None,
    ) -> None:
        self.registry = registry
        self.uses = uses
        self.settings = settings
        self.db = db
        self.storage = storage
        self.cache = cache
        self.documents = documents
        self.origins = origins
        self.http = http
        self.forget_artifact = forget_artifact
        self.delete_grace_secs = DELETE_GRACE_SECS
        self.last_report: RetentionReport | None = None
        self._owner = uuid.uuid4().hex
        self._deletions = BackgroundWrites()

    async def settle(self) -> None:
        """Wait for blob deletions in progress (tests)."""
        await self._deletions.settle()

    async def close(self) -> None:
        await self._deletions.cancel()

    # --- what there is ------------------------------------------------------------------------

    async def usage(self) -> dict[str, Any]:
        """How much proxied content the registry holds, by kind."""
        artifacts = await self.db.fetchrow(
            "SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS b FROM cached_artifacts WHERE registry = $1",
            self.registry,
        )
        documents = await self.db.fetchrow(
            "SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS b FROM upstream_documents WHERE registry = $1",
            self.registry,
        )
        assert artifacts is not None and documents is not None
        return {
            "artifacts": {"count": int(artifacts["n"]), "bytes": int(artifacts["b"])},
            "documents": {"count": int(documents["n"]), "bytes": int(documents["b"])},
            "bytes": int(artifacts["b"]) + int(documents["b"]),
        }

    async def _candidates(self) -> list[Candidate]:
        rows = await self.db.fetch(
            "SELECT storage_key, url, what, size, last_used FROM cached_artifacts WHERE registry = $1",
            self.registry,
        )
        found = [
            Candidate("artifact", r["storage_key"], int(r["size"]), float(r["last_used"]), r["what"], r["url"])
            for r in rows
        ]
        rows = await self.db.fetch(
            "SELECT name, variant, size, last_used FROM upstream_documents WHERE registry = $1", self.registry
        )
        found += [
            Candidate(
                "document",
                r["name"],
                int(r["size"]),
                float(r["last_used"]),
                f"{r['name']} ({r['variant']})",
                variant=r["variant"],
            )
            for r in rows
        ]
        found.sort(key=lambda c: c.last_used)
        return found

    # --- a run ----------------------------------------------------------------------------------

    async def run(
        self, *, dry_run: bool | None = None, settings: RetentionSettings | None = None
    ) -> RetentionReport | None:
        """One run under the lease; None when another replica is running it. `settings` (a dry
        run only) previews other limits than the configured ones."""
        dry = self.settings.dry_run if dry_run is None else dry_run
        if settings is not None and not dry:
            raise ValueError("other limits than the configured ones can only be previewed (dry run)")
        lease = f"batlehub:lease:retention:{self.registry}"
        try:
            if not await self.cache.acquire_lease(lease, self._owner, LEASE_TTL_SECS):
                return None
        except Exception as exc:
            log.info("retention %s skipped: the cache backend does not answer (%s)", self.registry, exc)
            return None
        try:
            report = await self._run(dry, settings or self.settings)
        finally:
            with contextlib.suppress(Exception):
                await self.cache.release_lease(lease, self._owner)
        if settings is None:  # a preview of other limits is not the registry's last run
            self.last_report = report
            with contextlib.suppress(Exception):
                await self.cache.set(
                    self._report_key(), json.dumps(report.to_json()).encode(), ttl_secs=REPORT_TTL_SECS
                )
        if report.evicted_count or report.kept_not_upstream or report.stopped or dry:
            log.info("retention %s%s: %s", self.registry, " (dry run)" if dry else "", report.summary())
        return report

    async def stored_report(self) -> dict[str, Any] | None:
        """The last run's report, whichever replica ran it."""
        with contextlib.suppress(Exception):
            raw = await self.cache.get(self._report_key())
            if raw:
                found: dict[str, Any] = json.loads(raw)
                return found
        return self.last_report.to_json() if self.last_report else None

    def _report_key(self) -> str:
        return f"batlehub:retention:report:{self.registry}"

    async def _run(self, dry: bool, settings: RetentionSettings) -> RetentionReport:
        report = RetentionReport(
            self.registry, dry, time.time(), max_bytes=settings.max_bytes, max_idle_days=settings.max_idle_days
        )
        if self.uses is not None:
            await self.uses.flush(everything=True)  # what this replica served a moment ago is in use
        candidates = await self._candidates()
        total = sum(c.size for c in candidates)
        report.bytes_before = report.bytes_after = total
        idle_before = time.time() - settings.max_idle_days * 86400 if settings.max_idle_days > 0 else None
        victims = [c for c in candidates if idle_before is not None and c.last_used < idle_before]
        over = total - sum(c.size for c in victims) - settings.max_bytes if settings.max_bytes > 0 else 0
        for c in candidates:  # oldest first: the least recently used go until under the cap
            if over <= 0:
                break
            if idle_before is None or c.last_used >= idle_before:
                victims.append(c)
                over -= c.size

        evicted: list[Candidate] = []
        failures = 0
        checks = asyncio.Semaphore(CHECKS_AT_ONCE)

        async def check(c: Candidate) -> bool | None:
            async with checks:
                return await self._upstream_has(c)

        # In slices, so an unreachable upstream stops the run after a few questions.
        for start in range(0, len(victims), CHECKS_AT_ONCE):
            batch = victims[start : start + CHECKS_AT_ONCE]
            answers = await asyncio.gather(*(check(c) for c in batch))
            for c, has in zip(batch, answers, strict=True):
                if has is None:
                    failures += 1
                    report.kept_unchecked += 1
                elif not has:
                    failures = 0
                    if len(report.kept_not_upstream) < LISTED_MAX:
                        report.kept_not_upstream.append(c.describe())
                else:
                    failures = 0
                    evicted.append(c)
            if failures >= UNREACHABLE_STOP:
                report.stopped = "the upstream registry does not answer; nothing else is evicted until it does"
                report.kept_unchecked += len(victims) - start - len(batch)
                break

        blobs: list[str] = []
        for c in evicted:
            if not dry:
                blob = await self._evict(c)
                if blob is False:
                    continue  # used or fetched again meanwhile
                if isinstance(blob, str):
                    blobs.append(blob)
            report.evicted_count += 1
            report.reclaimed_bytes += c.size
            if len(report.evicted) < LISTED_MAX:
                report.evicted.append(c.describe())
        report.bytes_after = total - report.reclaimed_bytes
        if blobs:
            self._deletions.spawn(self._delete_blobs(blobs, since=report.started))
        report.finished = time.time()
        if not dry:
            metrics.count_reclaimed(
                "retention", report.reclaimed_bytes, blobs=report.evicted_count, registry=self.registry
            )
        return report

    async def _upstream_has(self, c: Candidate) -> bool | None:
        """Whether the upstream still serves the item: True, False (404/410), None (no answer)."""
        if c.kind == "artifact":
            if not c.url or not self.origins.allows(URL(c.url)):
                return False  # not refetchable from a configured upstream: keep it
            return await self._head(c.url)
        documents = self._documents_for(c.variant)
        if documents is None or not documents.upstreams:
            return False
        answers = []
        for upstream in documents.upstreams:
            answer = await self._head(upstream + documents.format.path(c.key))
            if answer:
                return True
            answers.append(answer)
        return None if None in answers else False

    def _documents_for(self, variant: str) -> UpstreamDocuments | None:
        return next((d for d in self.documents() if variant in d.format.accept), None)

    async def _head(self, url: str) -> bool | None:
        try:
            async with self.origins.request(self.http(), "HEAD", URL(url, encoded=True), timeout=CHECK_TIMEOUT) as resp:
                if resp.status in (404, 410):
                    return False
                return True if resp.status < 400 else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("retention %s: HEAD %s failed: %s", self.registry, url, exc)
            return None

    async def _evict(self, c: Candidate) -> str | bool | None:
        """Remove the registry's rows for `c`; the blob key to delete after the grace period, None
        when there is none, False when `c` was used meanwhile and stays."""
        if c.kind == "document":
            documents = self._documents_for(c.variant)
            return await documents.forget(c.key, c.variant, used_before=c.last_used) if documents else False
        async with self.db.transaction() as conn:
            removed = await conn.execute(
                "DELETE FROM cached_artifacts WHERE registry = $1 AND storage_key = $2 AND last_used <= $3",
                self.registry,
                c.key,
                c.last_used,
            )
            if not removed:
                return False
            shared = await conn.fetchrow(
                "SELECT 1 AS hit FROM cached_artifacts WHERE storage_key = $1"
                " UNION ALL SELECT 1 AS hit FROM files WHERE artifact_key = $1"
                " UNION ALL SELECT 1 AS hit FROM versions WHERE artifact_key = $1"
                " UNION ALL SELECT 1 AS hit FROM upstream_documents WHERE body_key = $1 LIMIT 1",
                c.key,
            )
            if shared is not None:
                return None  # another registry or a local package still has it
            await conn.execute("DELETE FROM artifacts WHERE storage_key = $1", c.key)
        self.forget_artifact(c.key)
        return c.key

    async def _delete_blobs(self, keys: list[str], *, since: float) -> None:
        """Delete evicted blobs once no process can still be serving them (a shutdown meanwhile
        leaves them to the orphan sweep)."""
        await asyncio.sleep(self.delete_grace_secs)
        for key in keys:
            try:
                stat = await self.storage.stat(key)
                if stat is None or stat.modified >= since or await is_referenced(self.db, key):
                    continue  # gone already, or stored and recorded again meanwhile
                await self.storage.delete(key)
            except Exception as exc:  # left to the orphan sweep
                log.warning("retention %s: could not delete %s: %s", self.registry, key, exc)


def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    """A `cleanup_ctx`: writes uses every `USE_FLUSH_SECS` and runs each registry's retention
    every `RUN_EVERY_SECS` (jittered, so replicas do not all reach for the lease at once)."""
    return _retention_ctx(app)


async def _retention_ctx(app: web.Application) -> AsyncIterator[None]:
    services = app[appkeys.REGISTRY_SERVICES]

    async def flush_uses() -> None:
        while True:
            await asyncio.sleep(USE_FLUSH_SECS)
            for s in services.values():
                try:
                    await s.uses.flush()
                except Exception as exc:
                    log.warning("registry %s: could not record what was used (retention): %s", s.registry.name, exc)

    async def run(retention: Retention) -> None:
        await asyncio.sleep(FIRST_RUN_SECS * random.uniform(0.5, 1.5))
        while True:
            try:
                await retention.run()
            except Exception as exc:
                log.warning("retention %s failed, retrying in %g s: %s", retention.registry, RUN_EVERY_SECS, exc)
            await asyncio.sleep(RUN_EVERY_SECS * random.uniform(0.9, 1.1))

    tasks = [asyncio.create_task(flush_uses(), name="batlehub-retention-uses")]
    tasks += [
        asyncio.create_task(run(s.retention), name=f"batlehub-retention-{name}")
        for name, s in services.items()
        if s.registry.retention is not None
    ]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for s in services.values():
        with contextlib.suppress(Exception):
            await s.uses.flush()


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"
