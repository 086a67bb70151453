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
from batlehub.errors import AlreadyExists, ServiceUnavailable, StartupError

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
        """`async with db.transaction() as conn:` — commits on success, rolls back on error.

        A statement that breaks a unique constraint raises `AlreadyExists` (a `Conflict`)."""

    def snapshot(self) -> Any:
        """`async with db.snapshot() as conn:` — read-only; every read sees the same committed
        state, however many writes other connections commit meanwhile."""

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
    (
        3,
        "files of versions, package and scope owners, names reserved for local use",
        [
            # A version may have several files (wheels and an sdist); `versions.artifact_key` keeps
            # naming the first one, for releases that still read it.
            """CREATE TABLE files (
                registry TEXT NOT NULL,
                name TEXT NOT NULL,
                version TEXT NOT NULL,
                filename TEXT NOT NULL,
                artifact_key TEXT NOT NULL,
                size BIGINT NOT NULL,
                created DOUBLE PRECISION NOT NULL,
                meta TEXT NOT NULL DEFAULT '{}',
                PRIMARY KEY (registry, name, filename))""",
            "CREATE INDEX files_version ON files (registry, name, version)",
            "CREATE INDEX files_artifact ON files (artifact_key)",
            "CREATE INDEX versions_artifact ON versions (artifact_key)",
            "ALTER TABLE artifacts ADD COLUMN sha256 TEXT",
            # Every version before this migration is npm's (the only format then): one tarball,
            # named `<name without scope>-<version>.tgz`.
            {
                "sqlite": """INSERT INTO files (registry, name, version, filename, artifact_key, size, created)
                    SELECT registry, name, version,
                      CASE WHEN instr(name, '/') > 0 THEN substr(name, instr(name, '/') + 1) ELSE name END
                        || '-' || version || '.tgz',
                      artifact_key, size, created
                    FROM versions WHERE artifact_key IS NOT NULL""",
                "postgresql": """INSERT INTO files (registry, name, version, filename, artifact_key, size, created)
                    SELECT registry, name, version,
                      CASE WHEN strpos(name, '/') > 0 THEN substr(name, strpos(name, '/') + 1) ELSE name END
                        || '-' || version || '.tgz',
                      artifact_key, size, created
                    FROM versions WHERE artifact_key IS NOT NULL""",
            },
            """CREATE TABLE package_owners (
                registry TEXT NOT NULL,
                name TEXT NOT NULL,
                user_id TEXT NOT NULL,
                added_by TEXT,
                added DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (registry, name, user_id))""",
            # Whoever published a version so far could change the package: they are its owners.
            """INSERT INTO package_owners (registry, name, user_id, added_by, added)
                SELECT registry, name, publisher, publisher, MIN(created) FROM versions
                WHERE publisher IS NOT NULL GROUP BY registry, name, publisher""",
            """CREATE TABLE scope_owners (
                registry TEXT NOT NULL,
                scope TEXT NOT NULL,
                user_id TEXT NOT NULL,
                added_by TEXT,
                added DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (registry, scope, user_id))""",
            # npm scopes (`@scope/name`) published so far belong to whoever published in them.
            {
                "sqlite": """INSERT INTO scope_owners (registry, scope, user_id, added_by, added)
                    SELECT registry, substr(name, 1, instr(name, '/') - 1), publisher, publisher, MIN(created)
                    FROM versions WHERE publisher IS NOT NULL AND name LIKE '@%/%'
                    GROUP BY registry, substr(name, 1, instr(name, '/') - 1), publisher""",
                "postgresql": """INSERT INTO scope_owners (registry, scope, user_id, added_by, added)
                    SELECT registry, split_part(name, '/', 1), publisher, publisher, MIN(created)
                    FROM versions WHERE publisher IS NOT NULL AND name LIKE '@%/%'
                    GROUP BY registry, split_part(name, '/', 1), publisher""",
            },
            """CREATE TABLE reserved_names (
                registry TEXT NOT NULL,
                name TEXT NOT NULL,
                reason TEXT NOT NULL DEFAULT '',
                reserved_by TEXT,
                created DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (registry, name))""",
        ],
    ),
    (
        4,
        "the order in which dist-tags were created",
        [
            # Clients print tags in the order they get them, and registries keep insertion order.
            "ALTER TABLE dist_tags ADD COLUMN created DOUBLE PRECISION NOT NULL DEFAULT 0",
        ],
    ),
    (
        5,
        "big upstream documents in storage; what retention needs to evict proxied content",
        [
            # A big body lives in storage under `body_key` (the row's `body` then holds the header).
            "ALTER TABLE upstream_documents ADD COLUMN body_key TEXT",
            "ALTER TABLE upstream_documents ADD COLUMN size BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE upstream_documents ADD COLUMN last_used DOUBLE PRECISION NOT NULL DEFAULT 0",
            "UPDATE upstream_documents SET size = LENGTH(body), last_used = fetched",
            "CREATE INDEX upstream_documents_body_key ON upstream_documents (body_key)",
            "CREATE INDEX upstream_documents_used ON upstream_documents (registry, last_used)",
            # A registry's claim on an artifact it fetched from its upstream: what it may evict.
            # Blobs are shared by content, so a blob goes only when no claim and no local file
            # (`files`, `versions`) names it any more.
            """CREATE TABLE cached_artifacts (
                registry TEXT NOT NULL,
                storage_key TEXT NOT NULL,
                url TEXT NOT NULL,
                what TEXT NOT NULL,
                size BIGINT NOT NULL,
                fetched DOUBLE PRECISION NOT NULL,
                last_used DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (registry, storage_key))""",
            "CREATE INDEX cached_artifacts_used ON cached_artifacts (registry, last_used)",
            "CREATE INDEX cached_artifacts_key ON cached_artifacts (storage_key)",
        ],
    ),
    (
        6,
        "web UI sessions, and a summary beside each upstream document for listings",
        [
            # Only hashes: a copy of this table signs nobody in. A session ends with its token.
            """CREATE TABLE web_sessions (
                id_hash TEXT PRIMARY KEY,
                token_hash TEXT NOT NULL,
                csrf TEXT NOT NULL,
                created DOUBLE PRECISION NOT NULL,
                expires DOUBLE PRECISION NOT NULL)""",
            "CREATE INDEX web_sessions_token ON web_sessions (token_hash)",
            # A listing of a thousand proxied names must not parse a thousand packuments.
            "ALTER TABLE upstream_documents ADD COLUMN summary TEXT NOT NULL DEFAULT '{}'",
        ],
    ),
    (
        7,
        "policy rules (block, allow, exemptions) and their revision counter",
        [
            """CREATE TABLE policy_rules (
                id TEXT PRIMARY KEY,
                registry TEXT NOT NULL,
                kind TEXT NOT NULL,
                package TEXT NOT NULL,
                versions TEXT NOT NULL DEFAULT '*',
                reason TEXT NOT NULL DEFAULT '',
                author TEXT,
                created DOUBLE PRECISION NOT NULL,
                expires DOUBLE PRECISION)""",
            # One row: every change of the rules bumps it in the change's own transaction, and
            # replicas compare it (mirrored in the cache backend) with what they loaded.
            "CREATE TABLE policy_revision (id INTEGER PRIMARY KEY, revision BIGINT NOT NULL)",
            "INSERT INTO policy_revision (id, revision) VALUES (1, 0)",
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


def _sqlite_unique(exc: BaseException) -> bool:
    import sqlite3

    return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc).upper()


class _SqliteConnection:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def _execute(self, sql: str, args: tuple[Any, ...]) -> Any:
        try:
            return await self._conn.execute(_sqlite_sql(sql), args)
        except Exception as exc:
            if _sqlite_unique(exc):
                raise AlreadyExists(f"already exists: {exc}") from exc
            raise

    async def execute(self, sql: str, *args: Any) -> int:
        cursor = await self._execute(sql, args)
        rowcount = cursor.rowcount
        await cursor.close()
        return int(rowcount if rowcount is not None and rowcount >= 0 else 0)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        cursor = await self._execute(sql, args)
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
    async def snapshot(self) -> AsyncIterator[_SqliteConnection]:
        """A deferred transaction: in WAL mode its reads share one snapshot of the database."""
        if self._in_transaction.get():
            yield _SqliteConnection(self._conn)
            return
        async with self._lock:
            token = self._in_transaction.set(True)
            try:
                await self._conn.execute("BEGIN")
                try:
                    yield _SqliteConnection(self._conn)
                finally:
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


@asynccontextmanager
async def _pg_errors() -> AsyncIterator[None]:
    import asyncpg

    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        raise AlreadyExists(f"already exists: {exc}") from exc


class _PgConnection:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        async with _pg_errors():
            status = await self._conn.execute(sql, *args)
        try:
            return int(str(status).rsplit(" ", 1)[-1])
        except ValueError:
            return 0

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with _pg_errors():
            return [dict(r) for r in await self._conn.fetch(sql, *args)]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        async with _pg_errors():
            row = await self._conn.fetchrow(sql, *args)
        return dict(row) if row is not None else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with _pg_errors():
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
    async def snapshot(self) -> AsyncIterator[_PgConnection]:
        async with self._acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
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


__all__: Sequence[str] = (
    "MIGRATIONS",
    "Connection",
    "Database",
    "PostgresDatabase",
    "SqliteDatabase",
    "create_database",
    "schema_version",
)
