"""The database: SQLite (embedded default, one node) or PostgreSQL (several replicas).

Both speak through one small interface. SQL is written once, PostgreSQL style, with `$1, $2, ...`
placeholders; the SQLite side rewrites them to SQLite's numbered `?1, ?2, ...`. Rows come back as
plain dicts. Write portable SQL: `ON CONFLICT`, `RETURNING`, numbers for times (epoch seconds) and
booleans (0/1), TEXT for JSON.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from batlehub.config import Settings
from batlehub.errors import ServiceUnavailable, StartupError

log = logging.getLogger(__name__)

Row = dict[str, Any]


class Connection(Protocol):
    """A connection inside a transaction (or autocommit, for the `Database` shortcuts)."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; return the number of rows it changed."""

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """All rows of a query."""

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        """The first row, or None."""

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None."""


class Database(Protocol):
    dialect: str
    """"sqlite" or "postgresql"."""

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Return if the database answers; raise otherwise."""

    def transaction(self) -> Any:
        """`async with db.transaction() as conn:` — commits on success, rolls back on error."""

    async def execute(self, sql: str, *args: Any) -> int: ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...

    async def migrate(self, progress: Any = None) -> list[int]:
        """Apply pending migrations exactly once, even with several replicas starting together.
        Returns the versions applied by this call."""


# --- migrations ----------------------------------------------------------------------------------
# Numbered and additive: never drop or rename what the previous release reads. Each entry is
# (version, description, statements); a statement may be a dict {"sqlite": ..., "postgresql": ...}.

MIGRATIONS: list[tuple[int, str, list[Any]]] = [
    (
        1,
        "packages, versions, dist-tags, artifacts, tokens, quota, audit log, upstream documents",
        [
            """CREATE TABLE packages (
                registry TEXT NOT NULL,
                name TEXT NOT NULL,
                revision INTEGER NOT NULL DEFAULT 1,
                created DOUBLE PRECISION NOT NULL,
                modified DOUBLE PRECISION NOT NULL,
                extra TEXT NOT NULL DEFAULT '{}',
                PRIMARY KEY (registry, name))""",
            """CREATE TABLE versions (
                registry TEXT NOT NULL,
                name TEXT NOT NULL,
                version TEXT NOT NULL,
                manifest TEXT NOT NULL,
                artifact_key TEXT,
                size BIGINT NOT NULL DEFAULT 0,
                publisher TEXT,
                created DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (registry, name, version))""",
            """CREATE TABLE dist_tags (
                registry TEXT NOT NULL,
                name TEXT NOT NULL,
                tag TEXT NOT NULL,
                version TEXT NOT NULL,
                PRIMARY KEY (registry, name, tag))""",
            """CREATE TABLE artifacts (
                storage_key TEXT PRIMARY KEY,
                size BIGINT NOT NULL,
                sha512 TEXT NOT NULL,
                sha1 TEXT NOT NULL,
                created DOUBLE PRECISION NOT NULL)""",
            """CREATE TABLE tokens (
                id TEXT PRIMARY KEY,
                token_hash TEXT NOT NULL UNIQUE,
                user_id TEXT NOT NULL,
                role TEXT NOT NULL,
                created DOUBLE PRECISION NOT NULL,
                expires DOUBLE PRECISION,
                last_used DOUBLE PRECISION,
                revoked INTEGER NOT NULL DEFAULT 0,
                description TEXT NOT NULL DEFAULT '')""",
            """CREATE TABLE quota_usage (
                registry TEXT NOT NULL,
                user_id TEXT NOT NULL,
                bytes BIGINT NOT NULL DEFAULT 0,
                versions INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (registry, user_id))""",
            {
                "sqlite": """CREATE TABLE audit_log (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    ts DOUBLE PRECISION NOT NULL, registry TEXT, user_id TEXT, action TEXT NOT NULL,
                    target TEXT, client_ip TEXT, result TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '')""",
                "postgresql": """CREATE TABLE audit_log (
                    id BIGSERIAL PRIMARY KEY,
                    ts DOUBLE PRECISION NOT NULL, registry TEXT, user_id TEXT, action TEXT NOT NULL,
                    target TEXT, client_ip TEXT, result TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '')""",
            },
            "CREATE INDEX audit_log_ts ON audit_log (ts)",
            """CREATE TABLE upstream_documents (
                registry TEXT NOT NULL,
                name TEXT NOT NULL,
                variant TEXT NOT NULL,
                body BYTEA NOT NULL,
                etag TEXT,
                last_modified TEXT,
                fetched DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (registry, name, variant))""",
        ],
    ),
    (
        2,
        "replica heartbeats",
        [
            """CREATE TABLE replicas (
                id TEXT PRIMARY KEY,
                host TEXT NOT NULL,
                pid INTEGER NOT NULL,
                started DOUBLE PRECISION NOT NULL,
                last_seen DOUBLE PRECISION NOT NULL)""",
        ],
    ),
]


def _for_dialect(statement: Any, dialect: str) -> str:
    if isinstance(statement, dict):
        return str(statement[dialect])
    text = str(statement)
    if dialect == "sqlite":
        text = text.replace("BYTEA", "BLOB").replace("DOUBLE PRECISION", "REAL")
    return text


# --- SQLite --------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\$(\d+)")


def _sqlite_sql(sql: str) -> str:
    return _PLACEHOLDER.sub(r"?\1", sql)


class _SqliteConnection:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        cursor = await self._conn.execute(_sqlite_sql(sql), args)
        rowcount = cursor.rowcount
        await cursor.close()
        return int(rowcount if rowcount is not None and rowcount >= 0 else 0)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        cursor = await self._conn.execute(_sqlite_sql(sql), args)
        rows = await cursor.fetchall()
        names = [d[0] for d in cursor.description or ()]
        await cursor.close()
        return [dict(zip(names, row, strict=True)) for row in rows]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return next(iter(row.values())) if row else None


class SqliteDatabase:
    """One aiosqlite connection; transactions are serialized by a lock (SQLite has one writer)."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._in_transaction: contextvars.ContextVar[bool] = contextvars.ContextVar(
            f"sqlite_tx_{id(self)}", default=False
        )

    async def connect(self) -> None:
        import aiosqlite

        try:  # a bad path (a file in the way, no permission, not a database) is one clear line
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = await aiosqlite.connect(str(self.path), isolation_level=None)
            await self._conn.execute("PRAGMA journal_mode=WAL")
            await self._conn.execute("PRAGMA synchronous=NORMAL")
            await self._conn.execute("PRAGMA busy_timeout=5000")
        except Exception as exc:
            await self.close()
            raise StartupError(f"cannot open the SQLite database at {self.path}: {exc}") from exc

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def ping(self) -> None:
        await self.fetchval("SELECT 1")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_SqliteConnection]:
        async with self._lock:
            token = self._in_transaction.set(True)
            try:
                await self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield _SqliteConnection(self._conn)
                except BaseException:
                    await self._conn.execute("ROLLBACK")
                    raise
                else:
                    await self._conn.execute("COMMIT")
            finally:
                self._in_transaction.reset(token)

    @asynccontextmanager
    async def _statement(self) -> AsyncIterator[_SqliteConnection]:
        """The connection for one statement. Inside our own transaction (this task, or a task it
        started) the statement joins it: waiting for our own lock would never end."""
        if self._in_transaction.get():
            yield _SqliteConnection(self._conn)
            return
        async with self._lock:
            yield _SqliteConnection(self._conn)

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._statement() as conn:
            return await conn.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._statement() as conn:
            return await conn.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        async with self._statement() as conn:
            return await conn.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self._statement() as conn:
            return await conn.fetchval(sql, *args)

    async def migrate(self, progress: Any = None) -> list[int]:
        async with self.transaction() as conn:  # BEGIN IMMEDIATE: one writer, so one migrator
            return await _apply_migrations(conn, self.dialect, progress)


# --- PostgreSQL ----------------------------------------------------------------------------------


class _PgConnection:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        status = await self._conn.execute(sql, *args)
        try:
            return int(str(status).rsplit(" ", 1)[-1])
        except ValueError:
            return 0

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return [dict(r) for r in await self._conn.fetch(sql, *args)]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row = await self._conn.fetchrow(sql, *args)
        return dict(row) if row is not None else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetchval(sql, *args)


# Any constant works; it only has to be the same for every replica of BatleHub.
_MIGRATION_LOCK_ID = 0x6261746C65687562 & 0x7FFFFFFFFFFFFFFF


class PostgresDatabase:
    """An asyncpg pool of at most `max_connections`."""

    dialect = "postgresql"

    def __init__(self, url: str, max_connections: int = 10) -> None:
        self.url = url
        self.max_connections = max_connections
        self._pool: Any = None

    async def connect(self) -> None:
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=self.max_connections, command_timeout=30, timeout=10
            )
        except Exception as exc:
            raise StartupError(f"cannot connect to PostgreSQL at {_redact(self.url)}: {exc}") from exc

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def ping(self) -> None:
        await self.fetchval("SELECT 1")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_PgConnection]:
        async with self._acquire() as conn, conn.transaction():
            yield _PgConnection(conn)

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[Any]:
        import asyncpg

        try:
            async with self._pool.acquire(timeout=10) as conn:
                yield conn
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise ServiceUnavailable("database unavailable") from exc

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._acquire() as conn:
            return await _PgConnection(conn).execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._acquire() as conn:
            return await _PgConnection(conn).fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        async with self._acquire() as conn:
            return await _PgConnection(conn).fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self._acquire() as conn:
            return await _PgConnection(conn).fetchval(sql, *args)

    async def migrate(self, progress: Any = None) -> list[int]:
        async with self._acquire() as raw:
            # A session-level advisory lock: replicas starting together queue here, and each
            # migration is applied by exactly one of them.
            await raw.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_ID)
            try:
                async with raw.transaction():
                    return await _apply_migrations(_PgConnection(raw), self.dialect, progress)
            finally:
                await raw.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_ID)


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


async def _apply_migrations(conn: Connection, dialect: str, progress: Any) -> list[int]:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied DOUBLE PRECISION NOT NULL)"
        if dialect == "postgresql"
        else "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied REAL NOT NULL)"
    )
    done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    applied = []
    pending = [m for m in MIGRATIONS if m[0] not in done]
    for index, (version, description, statements) in enumerate(pending, 1):
        if progress:
            progress(f"migration {version} ({index}/{len(pending)}): {description}")
        for statement in statements:
            await conn.execute(_for_dialect(statement, dialect))
        await conn.execute(
            "INSERT INTO schema_migrations (version, description, applied) VALUES ($1, $2, $3)",
            version,
            description,
            time.time(),
        )
        applied.append(version)
    return applied


def create_database(settings: Settings) -> Database:
    if settings.database.type == "postgresql":
        return PostgresDatabase(settings.database.url, settings.database.max_connections)
    return SqliteDatabase(settings.sqlite_path)


async def schema_version(db: Database) -> int:
    return int(await db.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations") or 0)


def placeholders(start: int, count: int) -> str:
    """`$start, $start+1, ...` for IN lists."""
    return ", ".join(f"${i}" for i in range(start, start + count))


__all__: Sequence[str] = (
    "MIGRATIONS",
    "Connection",
    "Database",
    "PostgresDatabase",
    "SqliteDatabase",
    "create_database",
    "schema_version",
)
