"""The database and the storage backend, timed for metrics and traced as child spans.

`create_app` wraps the configured backends in these when metrics or tracing are on (and not
otherwise, so that with both off a statement costs what it did). Everything else is passed
through untouched: a wrapper answers for the backend's own attributes too.

What counts as an error of the database: what the driver or the connection raised. A unique-key
conflict (`AlreadyExists`) is an answer, and so is anything a caller raised inside a transaction
(a quota refusal rolls back, but the database did nothing wrong).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from opentelemetry import trace

from batlehub import tracing
from batlehub.db import Connection, Database, Row
from batlehub.errors import BatleHubError, ServiceUnavailable
from batlehub.interfaces import BlobStat, StorageBackend, StoredBlob
from batlehub.metrics import HubMetrics

CLIENT = trace.SpanKind.CLIENT


def storage_failed(exc: BaseException) -> bool:
    """Whether `exc` is the storage's failure. A refusal it reports on purpose (`NotFound`, a
    digest mismatch, too many bytes, a bad key) is an answer; a cancelled request is nobody's."""
    if isinstance(exc, ServiceUnavailable):
        return True
    return isinstance(exc, Exception) and not isinstance(exc, BatleHubError | ValueError)


def database_failed(exc: BaseException) -> bool:
    """Whether `exc` is the database's failure rather than an answer or the caller's own error."""
    if isinstance(exc, ServiceUnavailable):
        return True
    if isinstance(exc, BatleHubError):
        return False
    return isinstance(exc, sqlite3.Error | OSError | TimeoutError) or type(exc).__module__.startswith("asyncpg")


class _Timed:
    """Times and traces statements of one dialect."""

    def __init__(self, metrics: HubMetrics | None, dialect: str) -> None:
        self.metrics = metrics
        self.dialect = dialect

    async def run(self, operation: str, sql: str, call: Any, *args: Any) -> Any:
        if tracing.active:
            with tracing.tracer.start_as_current_span(
                f"db {operation}",
                kind=CLIENT,
                attributes={"db.system.name": self.dialect, "db.operation.name": operation, "db.query.text": sql},
            ):
                return await self._timed(operation, call, *args)
        return await self._timed(operation, call, *args)

    async def _timed(self, operation: str, call: Any, *args: Any) -> Any:
        if self.metrics is None:
            return await call(*args)
        started = time.perf_counter()
        try:
            return await call(*args)
        except BaseException as exc:
            if database_failed(exc):
                self.metrics.database_errors.labels(operation).inc()
            raise
        finally:
            self.metrics.database_seconds.labels(operation).observe(time.perf_counter() - started)


class ObservedConnection:
    """A connection inside a transaction, each statement timed."""

    def __init__(self, conn: Connection, timed: _Timed) -> None:
        self._conn = conn
        self._timed = timed

    async def execute(self, sql: str, *args: Any) -> int:
        result: int = await self._timed.run("execute", sql, self._conn.execute, sql, *args)
        return result

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        result: list[Row] = await self._timed.run("fetch", sql, self._conn.fetch, sql, *args)
        return result

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        result: Row | None = await self._timed.run("fetchrow", sql, self._conn.fetchrow, sql, *args)
        return result

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._timed.run("fetchval", sql, self._conn.fetchval, sql, *args)


class ObservedDatabase(ObservedConnection):
    """A `Database` whose statements and transactions are timed and traced."""

    def __init__(self, db: Database, metrics: HubMetrics | None) -> None:
        super().__init__(db, _Timed(metrics, db.dialect))
        self.db = db
        self.dialect = db.dialect
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    async def connect(self) -> None:
        await self.db.connect()

    async def close(self) -> None:
        await self.db.close()

    async def ping(self) -> None:
        await self.fetchval("SELECT 1")

    async def migrate(self, progress: Any = None) -> list[int]:
        return await self.db.migrate(progress)

    def transaction(self) -> Any:
        """`Database.transaction`, timed as a whole (operation "transaction") and per statement."""
        return self._unit("transaction", self.db.transaction)

    def snapshot(self) -> Any:
        return self._unit("snapshot", self.db.snapshot)

    @asynccontextmanager
    async def _unit(self, operation: str, open_unit: Any) -> AsyncIterator[ObservedConnection]:
        span = None
        if tracing.active:
            span = tracing.tracer.start_span(
                f"db {operation}", kind=CLIENT, attributes={"db.system.name": self.dialect}
            )
        started = time.perf_counter()
        entered = False
        try:
            with trace.use_span(span, end_on_exit=True) if span is not None else _NO_SPAN:
                async with open_unit() as conn:
                    entered = True
                    yield ObservedConnection(conn, self._timed)
        except BaseException as exc:
            # Begin or commit failing is the database's error; the body's own exceptions are not.
            if self._metrics is not None and (not entered or database_failed(exc)):
                self._metrics.database_errors.labels(operation).inc()
            raise
        finally:
            if self._metrics is not None:
                self._metrics.database_seconds.labels(operation).observe(time.perf_counter() - started)


class _NoSpan:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SPAN = _NoSpan()


class ObservedStorage:
    """A `StorageBackend` whose operations are timed and traced. `local_path` is passed through
    untimed: it is a local `lstat` on every download, and never fails."""

    def __init__(self, storage: StorageBackend, metrics: HubMetrics | None) -> None:
        self.storage = storage
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)

    async def open(self) -> None:
        await self.storage.open()

    async def close(self) -> None:
        await self.storage.close()

    async def ping(self) -> None:
        await self._run("ping", self.storage.ping)

    async def put(
        self,
        key: str,
        chunks: AsyncIterator[bytes],
        *,
        max_size: int | None = None,
        expected: Mapping[str, str] | None = None,
    ) -> StoredBlob:
        result: StoredBlob = await self._run("put", self.storage.put, key, chunks, max_size=max_size, expected=expected)
        return result

    async def get(self, key: str, start: int | None = None, end: int | None = None) -> AsyncIterator[bytes]:
        # Timed until the first bytes: the rest goes at the client's pace.
        span = tracing.tracer.start_span("storage get", kind=CLIENT) if tracing.active else None
        started = time.perf_counter()
        first = True
        try:
            with trace.use_span(span, end_on_exit=True) if span is not None else _NO_SPAN:
                async for chunk in self.storage.get(key, start, end):
                    if first:
                        first = False
                        self._observe("get", started)
                    yield chunk
        except BaseException as exc:
            if first:
                self._observe("get", started, failed=storage_failed(exc))
            raise
        if first:
            self._observe("get", started)

    async def stat(self, key: str) -> BlobStat | None:
        result: BlobStat | None = await self._run("stat", self.storage.stat, key)
        return result

    async def delete(self, key: str) -> bool:
        result: bool = await self._run("delete", self.storage.delete, key)
        return result

    async def list(self, prefix: str = "") -> AsyncIterator[BlobStat]:
        started = time.perf_counter()
        try:
            async for item in self.storage.list(prefix):
                yield item
        except BaseException as exc:
            self._observe("list", started, failed=storage_failed(exc))
            raise
        self._observe("list", started)

    def local_path(self, key: str) -> Path | None:
        return self.storage.local_path(key)

    async def presigned_url(self, key: str, expires_secs: int = 300) -> str | None:
        result: str | None = await self._run("presign", self.storage.presigned_url, key, expires_secs)
        return result

    async def _run(self, operation: str, call: Any, *args: Any, **kw: Any) -> Any:
        span = tracing.tracer.start_span(f"storage {operation}", kind=CLIENT) if tracing.active else None
        started = time.perf_counter()
        failed = False
        try:
            with trace.use_span(span, end_on_exit=True) if span is not None else _NO_SPAN:
                return await call(*args, **kw)
        except BaseException as exc:
            failed = storage_failed(exc)
            raise
        finally:
            self._observe(operation, started, failed=failed)

    def _observe(self, operation: str, started: float, *, failed: bool = False) -> None:
        if self._metrics is None:
            return
        self._metrics.storage_seconds.labels(operation).observe(time.perf_counter() - started)
        if failed:
            self._metrics.storage_errors.labels(operation).inc()
