"""The `postgres` cache backend: shared short-lived state in PostgreSQL tables.

Hooks implemented: `register_cache_backends` (provides `[cache] type = "postgres"`).

Config (`[cache]`): `url` (defaults to `database.url`, so a deployment that already runs on
PostgreSQL needs no other service) and `table_prefix` (default `batlehub_cache_`), which lets
several hubs share one database.

The backend has its own asyncpg pool, so cache traffic never queues behind database
transactions, and its own UNLOGGED tables (fast, not replicated, emptied after a crash — fine
for a cache), created on `open()` under an advisory lock so replicas starting together do not
race on `CREATE TABLE IF NOT EXISTS`. Every read-modify-write is a single statement
(`INSERT .. ON CONFLICT DO UPDATE .. RETURNING`, or a conditional `UPDATE`/`DELETE`), so it is
atomic across connections and replicas. Times come from the database's clock, not the
replicas', so replicas with drifting clocks still agree on what has expired. Expired rows are
ignored by every read and deleted by a background sweep once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from batlehub.configmodel import ConfigModel, core_settings
from batlehub.errors import ServiceUnavailable
from batlehub.interfaces import Banner, CacheBackendType, IpBlock, WindowCount
from batlehub.plugins import hookimpl

if TYPE_CHECKING:
    from batlehub.config import Settings

log = logging.getLogger(__name__)

DEFAULT_TABLE_PREFIX = "batlehub_cache_"
SWEEP_INTERVAL_SECS = 60.0
_PREFIX_RE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
# Epoch seconds by the database clock (`now()` would freeze at the transaction's start).
_NOW = "extract(epoch from clock_timestamp())::float8"


class PostgresCache:
    """A `CacheBackend` in PostgreSQL. `table_prefix` must be a plain lowercase identifier."""

    def __init__(self, url: str, table_prefix: str = DEFAULT_TABLE_PREFIX, max_connections: int = 10) -> None:
        if not _PREFIX_RE.match(table_prefix):
            raise ValueError(f"table_prefix must match {_PREFIX_RE.pattern}, got {table_prefix!r}")
        self.url = url
        self.table_prefix = table_prefix
        self.max_connections = max_connections
        self._pool: Any = None
        self._sweeper: asyncio.Task[None] | None = None
        p = table_prefix
        self._entries, self._counters, self._violations = f"{p}entries", f"{p}counters", f"{p}violations"
        self._blocks, self._banner, self._leases = f"{p}blocks", f"{p}banner", f"{p}leases"

    # --- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        import asyncpg

        self._pool = await asyncpg.create_pool(
            self.url, min_size=1, max_size=self.max_connections, command_timeout=10, timeout=10
        )
        try:
            await self._create_tables()
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="postgres-cache-sweep")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1")

    async def _create_tables(self) -> None:
        statements = [
            f"""CREATE UNLOGGED TABLE IF NOT EXISTS {self._entries} (
                key TEXT PRIMARY KEY, value BYTEA NOT NULL,
                fresh_until DOUBLE PRECISION, stale_until DOUBLE PRECISION)""",
            f"""CREATE UNLOGGED TABLE IF NOT EXISTS {self._counters} (
                key TEXT PRIMARY KEY, count BIGINT NOT NULL, expires_at DOUBLE PRECISION NOT NULL)""",
            f"""CREATE UNLOGGED TABLE IF NOT EXISTS {self._violations} (
                ip TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL)""",
            f"CREATE INDEX IF NOT EXISTS {self._violations}_ip ON {self._violations} (ip, at)",
            f"""CREATE UNLOGGED TABLE IF NOT EXISTS {self._blocks} (
                ip TEXT PRIMARY KEY, reason TEXT NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL, created_at DOUBLE PRECISION NOT NULL)""",
            f"""CREATE UNLOGGED TABLE IF NOT EXISTS {self._banner} (
                id INTEGER PRIMARY KEY CHECK (id = 1), message TEXT NOT NULL, level TEXT NOT NULL)""",
            f"""CREATE UNLOGGED TABLE IF NOT EXISTS {self._leases} (
                key TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL)""",
        ]
        # Concurrent CREATE TABLE IF NOT EXISTS can still fail on the catalog's unique index;
        # a transaction-scoped advisory lock (per prefix) makes replicas take turns.
        lock_id = zlib.crc32(f"batlehub-cache:{self.table_prefix}".encode())
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_id)
            for statement in statements:
                await conn.execute(statement)

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        import asyncpg

        if self._pool is None:
            raise ServiceUnavailable("cache is not open")
        try:
            async with self._pool.acquire(timeout=10) as conn:
                yield conn
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise ServiceUnavailable("cache unavailable (PostgreSQL)") from exc

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_SECS)
            try:
                await self.sweep()
            except Exception as exc:  # the next round tries again; reads ignore expired rows anyway
                log.warning("postgres cache: sweeping expired rows failed: %s", exc)

    async def sweep(self) -> int:
        """Delete every expired row; return how many. Runs in the background once a minute."""
        deleted = 0
        async with self._conn() as conn:
            for table, column in (
                (self._entries, "stale_until"),
                (self._counters, "expires_at"),
                (self._violations, "expires_at"),
                (self._blocks, "expires_at"),
                (self._leases, "expires_at"),
            ):
                status = await conn.execute(f"DELETE FROM {table} WHERE {column} <= {_NOW}")
                deleted += int(status.split()[-1])
        return deleted

    # --- metadata ---------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        async with self._conn() as conn:
            value: bytes | None = await conn.fetchval(
                f"SELECT value FROM {self._entries} WHERE key = $1 AND (fresh_until IS NULL OR fresh_until > {_NOW})",
                key,
            )
        return value

    async def get_stale(self, key: str) -> bytes | None:
        async with self._conn() as conn:
            value: bytes | None = await conn.fetchval(
                f"SELECT value FROM {self._entries} WHERE key = $1 AND (stale_until IS NULL OR stale_until > {_NOW})",
                key,
            )
        return value

    async def set(
        self, key: str, value: bytes, ttl_secs: float | None = None, stale_retention_secs: float = 86400.0
    ) -> None:
        if ttl_secs is None:
            fresh, stale = "NULL::float8", "NULL::float8"
            args: tuple[Any, ...] = (key, value)
        else:
            fresh, stale = f"{_NOW} + $3", f"{_NOW} + $3 + $4"
            args = (key, value, float(ttl_secs), max(float(stale_retention_secs), 0.0))
        async with self._conn() as conn:
            await conn.execute(
                f"INSERT INTO {self._entries} (key, value, fresh_until, stale_until)"
                f" VALUES ($1, $2, {fresh}, {stale})"
                " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value,"
                " fresh_until = EXCLUDED.fresh_until, stale_until = EXCLUDED.stale_until",
                *args,
            )

    async def invalidate(self, key: str) -> None:
        async with self._conn() as conn:
            await conn.execute(f"DELETE FROM {self._entries} WHERE key = $1", key)

    # --- rate-limit counters ------------------------------------------------------------------------

    async def incr_window(self, key: str, window_secs: float) -> WindowCount:
        # A fixed window that starts with the first hit. The row lock taken by ON CONFLICT makes
        # concurrent increments queue, and each sees the previous one's count.
        t = self._counters
        async with self._conn() as conn:
            row = await conn.fetchrow(
                f"INSERT INTO {t} AS c (key, count, expires_at) VALUES ($1, 1, {_NOW} + $2)"
                " ON CONFLICT (key) DO UPDATE SET"
                f" count = CASE WHEN c.expires_at > {_NOW} THEN c.count + 1 ELSE 1 END,"
                f" expires_at = CASE WHEN c.expires_at > {_NOW} THEN c.expires_at ELSE {_NOW} + $2 END"
                f" RETURNING count, expires_at - {_NOW} AS reset_in",
                key,
                float(window_secs),
            )
        return WindowCount(count=int(row["count"]), reset_in_secs=max(float(row["reset_in"]), 0.0))

    # --- IP violations and blocks -------------------------------------------------------------------

    async def record_violation(self, ip: str, window_secs: float) -> int:
        # A sliding log: one row per violation. The insert and the count run in one statement;
        # a data-modifying CTE's row is not visible to the outer query, hence the + 1.
        t = self._violations
        async with self._conn() as conn:
            count = await conn.fetchval(
                f"WITH n AS (SELECT {_NOW} AS now),"
                f" purged AS (DELETE FROM {t} WHERE ip = $1 AND expires_at <= (SELECT now FROM n)),"
                f" added AS (INSERT INTO {t} (ip, at, expires_at)"
                "   SELECT $1, now, now + $2 FROM n RETURNING 1)"
                f" SELECT count(*) + (SELECT count(*) FROM added) FROM {t}"
                " WHERE ip = $1 AND at > (SELECT now FROM n) - $2",
                ip,
                float(window_secs),
            )
        return int(count)

    async def block_ip(self, block: IpBlock) -> None:
        async with self._conn() as conn:
            await conn.execute(
                f"INSERT INTO {self._blocks} (ip, reason, expires_at, created_at) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (ip) DO UPDATE SET reason = EXCLUDED.reason,"
                " expires_at = EXCLUDED.expires_at, created_at = EXCLUDED.created_at",
                block.ip,
                block.reason,
                float(block.expires_at),
                float(block.created_at),
            )

    async def get_block(self, ip: str) -> IpBlock | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                f"SELECT ip, reason, expires_at, created_at FROM {self._blocks} WHERE ip = $1 AND expires_at > {_NOW}",
                ip,
            )
        return None if row is None else IpBlock(**dict(row))

    async def list_blocks(self) -> list[IpBlock]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT ip, reason, expires_at, created_at FROM {self._blocks} WHERE expires_at > {_NOW}"
            )
        return [IpBlock(**dict(row)) for row in rows]

    async def unblock_ip(self, ip: str) -> bool:
        async with self._conn() as conn:
            was_blocked = await conn.fetchval(
                f"WITH forgotten AS (DELETE FROM {self._violations} WHERE ip = $1),"
                f" lifted AS (DELETE FROM {self._blocks} WHERE ip = $1 RETURNING expires_at)"
                f" SELECT EXISTS (SELECT 1 FROM lifted WHERE expires_at > {_NOW})",
                ip,
            )
        return bool(was_blocked)

    # --- banner -------------------------------------------------------------------------------------

    async def get_banner(self) -> Banner | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(f"SELECT message, level FROM {self._banner} WHERE id = 1")
        return None if row is None else Banner(message=row["message"], level=row["level"])

    async def set_banner(self, banner: Banner | None) -> None:
        async with self._conn() as conn:
            if banner is None:
                await conn.execute(f"DELETE FROM {self._banner} WHERE id = 1")
            else:
                await conn.execute(
                    f"INSERT INTO {self._banner} (id, message, level) VALUES (1, $1, $2)"
                    " ON CONFLICT (id) DO UPDATE SET message = EXCLUDED.message, level = EXCLUDED.level",
                    banner.message,
                    banner.level,
                )

    # --- leases -------------------------------------------------------------------------------------

    async def acquire_lease(self, key: str, owner: str, ttl_secs: float) -> bool:
        # The conflicting row is updated only when it lapsed or is already ours; otherwise
        # nothing is returned. Concurrent inserts wait on the row lock and re-check the WHERE.
        t = self._leases
        async with self._conn() as conn:
            taken = await conn.fetchval(
                f"INSERT INTO {t} AS l (key, owner, expires_at) VALUES ($1, $2, {_NOW} + $3)"
                " ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at"
                f" WHERE l.expires_at <= {_NOW} OR l.owner = EXCLUDED.owner"
                " RETURNING true",
                key,
                owner,
                float(ttl_secs),
            )
        return bool(taken)

    async def release_lease(self, key: str, owner: str) -> bool:
        async with self._conn() as conn:
            released = await conn.fetchval(
                f"WITH gone AS (DELETE FROM {self._leases} WHERE key = $1 AND owner = $2 RETURNING expires_at)"
                f" SELECT EXISTS (SELECT 1 FROM gone WHERE expires_at > {_NOW})",
                key,
                owner,
            )
        return bool(released)

    async def extend_lease(self, key: str, owner: str, ttl_secs: float) -> bool:
        async with self._conn() as conn:
            status = await conn.execute(
                f"UPDATE {self._leases} SET expires_at = {_NOW} + $3"
                f" WHERE key = $1 AND owner = $2 AND expires_at > {_NOW}",
                key,
                owner,
                float(ttl_secs),
            )
        return bool(status == "UPDATE 1")


def _postgres_url(url: str) -> str:
    if not url.startswith(("postgresql://", "postgres://")):
        raise ValueError(f"expected a postgresql:// URL, got {url!r}")
    return url


def _table_prefix(prefix: str) -> str:
    # The prefix is spliced into SQL as an identifier, so only a plain one is allowed.
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"expected lowercase letters, digits and _ (at most 40), got {prefix!r}")
    return prefix


class PostgresCacheConfig(ConfigModel):
    """`[cache]` of `type = "postgres"`."""

    url: Annotated[str, AfterValidator(_postgres_url)] | None = Field(default=None, validate_default=True)
    """None: the database's own `database.url`."""
    table_prefix: Annotated[str, AfterValidator(_table_prefix)] = DEFAULT_TABLE_PREFIX

    @field_validator("url")
    @classmethod
    def _url_or_database(cls, url: str | None, info: ValidationInfo) -> str | None:
        settings = core_settings(info)
        if url is None and settings is not None and not settings.database.url:
            raise ValueError('required for the postgres cache (or set database.type = "postgresql")')
        return url


def _factory(config: PostgresCacheConfig, settings: Settings) -> PostgresCache:
    """Build from the validated `[cache]` table; `url` falls back to `database.url`."""
    return PostgresCache(config.url or settings.database.url, table_prefix=config.table_prefix)


@hookimpl
def register_cache_backends() -> list[CacheBackendType]:
    return [
        CacheBackendType(
            name="postgres",
            description="PostgreSQL tables shared by every replica (url defaults to database.url)",
            factory=_factory,
            shared=True,
            config_model=PostgresCacheConfig,
        )
    ]
