"""The orphan sweep: deletes stored blobs that no database row references.

A publish writes its blob first and commits the rows that point at it afterwards, so a version is
never visible without its artifact. The price: a replica that crashes (or a database that fails)
between the two leaves a blob nobody references. This periodic task finds such blobs and deletes
them once they are older than a grace period, so that a publish still in flight keeps its blob.

Only content-addressed blobs are considered: keys of the form `<format>/blobs/...` (e.g.
`npm/blobs/sha512/ab/ab12...`, see `batlehub.artifacts.blob_key`). A blob is referenced when a
`files.artifact_key`, a `versions.artifact_key`, an `artifacts.storage_key` or an
`upstream_documents.body_key` (a big upstream document) names it. One
replica sweeps at a time, under a lease in the cache backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from batlehub import appkeys, metrics
from batlehub.artifacts import is_blob_key, is_referenced
from batlehub.coordination import in_background
from batlehub.db import Database
from batlehub.interfaces import CacheBackend, StorageBackend

log = logging.getLogger("batlehub.sweep")

LEASE_KEY = "batlehub:lease:storage-sweep"
LEASE_TTL_SECS = 600.0


@dataclass
class SweepResult:
    deleted: list[str] = field(default_factory=list)
    examined: int = 0


async def sweep_orphans(db: Database, storage: StorageBackend, *, grace_secs: float) -> SweepResult:
    """Delete unreferenced blobs older than `grace_secs`; return what was deleted.

    The referenced set is read once; each candidate is checked again right before it is deleted
    (and its age re-read), because a publish may have committed a reference meanwhile.
    """
    rows = await db.fetch(
        "SELECT artifact_key AS key FROM versions WHERE artifact_key IS NOT NULL"
        " UNION SELECT artifact_key AS key FROM files"
        " UNION SELECT storage_key AS key FROM artifacts"
        " UNION SELECT body_key AS key FROM upstream_documents WHERE body_key IS NOT NULL"
    )
    referenced = {row["key"] for row in rows}
    result = SweepResult()
    cutoff = time.time() - grace_secs
    candidates = []
    async for blob in storage.list(""):
        if not is_blob_key(blob.key):
            continue
        result.examined += 1
        if blob.key not in referenced and blob.modified < cutoff:
            candidates.append(blob.key)
    for key in candidates:
        current = await storage.stat(key)
        if current is None or current.modified >= time.time() - grace_secs:
            continue
        if await is_referenced(db, key):
            continue
        if await storage.delete(key):
            result.deleted.append(key)
            metrics.count_reclaimed("sweep", current.size)
            log.info("sweep: deleted unreferenced blob %s (%d bytes)", key, current.size)
    return result


async def _sweep_once(
    db: Database, storage: StorageBackend, cache: CacheBackend, owner: str, grace_secs: float
) -> SweepResult | None:
    try:
        taken = await cache.acquire_lease(LEASE_KEY, owner, LEASE_TTL_SECS)
    except Exception as exc:
        log.info("sweep skipped: the cache backend does not answer (%s)", exc)
        return None
    if not taken:
        return None  # another replica is sweeping
    try:
        return await sweep_orphans(db, storage, grace_secs=grace_secs)
    finally:
        with contextlib.suppress(Exception):
            await cache.release_lease(LEASE_KEY, owner)


async def sweep_ctx(app: web.Application) -> AsyncIterator[None]:
    """A `cleanup_ctx` running the sweep every `[sweep] interval_secs` in the background."""
    settings = app[appkeys.SETTINGS].sweep
    if not settings.enabled:
        yield
        return
    owner = uuid.uuid4().hex

    async def loop() -> None:
        while True:
            # Jitter, so replicas started together do not all reach for the lease at once.
            await asyncio.sleep(settings.interval_secs * random.uniform(0.9, 1.1))
            try:
                result = await _sweep_once(
                    app[appkeys.DATABASE], app[appkeys.STORAGE], app[appkeys.CACHE], owner, settings.grace_secs
                )
            except Exception as exc:  # database or storage down: try again next time
                log.warning("sweep failed, retrying in %gs: %s", settings.interval_secs, exc)
                continue
            if result is not None and result.deleted:
                log.info("sweep: %d of %d blobs were unreferenced and deleted", len(result.deleted), result.examined)

    async with in_background(loop, "batlehub-storage-sweep"):
        yield
