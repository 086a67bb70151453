"""Replica heartbeats: each server process announces itself in the database, so it can tell
when other replicas share that database.

Why: a per-process cache (`memory`) or storage on a local disk (`filesystem`) is only correct for
one process. Several replicas behind a load balancer with those backends silently break rate
limits, single-flight fetches and downloads (a tarball published through one replica is missing on
the others). Each replica writes a row in `replicas` at start and every `HEARTBEAT_SECS`, and
looks for other rows seen recently; if it finds some while using such a backend it logs a loud
warning and reports it in health `warnings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from batlehub import appkeys
from batlehub.coordination import in_background
from batlehub.db import Database
from batlehub.interfaces import CacheBackendType, StorageBackendType

log = logging.getLogger("batlehub.replicas")

HEARTBEAT_SECS = 5.0
LIVE_SECS = 20.0
"""A replica whose last heartbeat is older than this is considered gone (e.g. it was killed)."""
FORGET_SECS = 86400.0
"""Rows of replicas gone for this long are deleted, so the table does not grow forever."""


class ReplicaHeartbeat:
    """This process's row in `replicas`, and the others that are alive."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.id = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = time.time()

    async def beat(self) -> None:
        now = time.time()
        updated = await self.db.execute("UPDATE replicas SET last_seen = $1 WHERE id = $2", now, self.id)
        if not updated:
            await self.db.execute(
                "INSERT INTO replicas (id, host, pid, started, last_seen) VALUES ($1, $2, $3, $4, $5)",
                self.id,
                self.host,
                self.pid,
                self.started,
                now,
            )

    async def others(self) -> list[dict[str, Any]]:
        """Other replicas whose heartbeat is recent."""
        rows = await self.db.fetch(
            "SELECT id, host, pid, started, last_seen FROM replicas WHERE id <> $1 AND last_seen >= $2",
            self.id,
            time.time() - LIVE_SECS,
        )
        return [dict(row) for row in rows]

    async def forget_old(self) -> None:
        await self.db.execute("DELETE FROM replicas WHERE last_seen < $1", time.time() - FORGET_SECS)

    async def leave(self) -> None:
        await self.db.execute("DELETE FROM replicas WHERE id = $1", self.id)


def single_process_backends(cache: CacheBackendType, storage: StorageBackendType) -> list[str]:
    """What in this configuration is only correct for a single process."""
    problems = []
    if not cache.shared:
        problems.append(f'[cache] type "{cache.name}" keeps its state per process')
    if not storage.shared:
        problems.append(f'[storage] type "{storage.name}" keeps artifacts on this machine')
    return problems


def replica_warning(others: list[dict[str, Any]], problems: list[str]) -> str:
    hosts = sorted({f"{o['host']} (pid {o['pid']})" for o in others})
    shown = ", ".join(hosts[:5]) + (f" and {len(hosts) - 5} more" if len(hosts) > 5 else "")
    return (
        f"{len(others)} other live replica(s) share this database ({shown}), but "
        + " and ".join(problems)
        + ": rate limits, leases and cached documents are not shared, and artifacts stored by one replica"
        " may be missing on another. Use a shared cache (postgres, redis) and shared storage (s3)"
        " when running several replicas."
    )


def heartbeat_ctx(
    cache: CacheBackendType, storage: StorageBackendType
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A `cleanup_ctx` that keeps this replica's heartbeat and warns about unsafe replica setups."""
    problems = single_process_backends(cache, storage)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        heartbeat = ReplicaHeartbeat(app[appkeys.DATABASE])
        state = app[appkeys.STATE]
        current: list[str] = []  # the warning in force, replaced when the set of replicas changes

        async def check() -> None:
            await heartbeat.beat()
            if not problems:
                return
            others = await heartbeat.others()
            message = replica_warning(others, problems) if others else None
            if current and current[0] != message:
                with contextlib.suppress(ValueError):
                    state.warnings.remove(current.pop())
            if message and not current:
                current.append(message)
                state.warn(message)
                log.warning("!" * 20 + " UNSAFE REPLICA SET-UP " + "!" * 20)
                log.warning("%s", message)

        async def loop() -> None:
            beats = 0
            while True:
                await asyncio.sleep(HEARTBEAT_SECS)
                try:
                    await check()
                    beats += 1
                    if beats % 720 == 1:
                        await heartbeat.forget_old()
                except Exception as exc:  # the database may be down for a while; keep beating
                    log.debug("replica heartbeat failed: %s", exc)

        try:
            await check()
        except Exception as exc:
            log.warning("could not register this replica's heartbeat: %s", exc)
        async with in_background(loop, "batlehub-replica-heartbeat"):
            yield
        with contextlib.suppress(Exception):
            await asyncio.wait_for(heartbeat.leave(), 3)

    return ctx
