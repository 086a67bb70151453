"""Per-user quotas: strict under concurrency (on PostgreSQL with several pools standing in for
replicas, and on SQLite), undone by a failed publish's rollback, and "warn" mode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batlehub.config import DEFAULT_RBAC, QuotaSettings, RegistrySettings
from batlehub.db import Database, PostgresDatabase, SqliteDatabase
from batlehub.quota import QuotaExceeded, consume, release


def registry(**quota: object) -> RegistrySettings:
    return RegistrySettings(
        type="npm",
        name="npm",
        rbac=dict(DEFAULT_RBAC),
        rate_limit=None,
        quota=QuotaSettings(**quota) if quota else None,  # type: ignore[arg-type]
        options={},
    )


async def usage(db: Database, user: str = "alice", registry_name: str = "npm") -> tuple[int, int]:
    row = await db.fetchrow(
        "SELECT bytes, versions FROM quota_usage WHERE registry = $1 AND user_id = $2", registry_name, user
    )
    return (int(row["bytes"]), int(row["versions"])) if row else (0, 0)


@pytest.fixture(params=["sqlite", "postgresql"])
async def databases(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[Database]]:
    """Migrated databases sharing one store: three pools on PostgreSQL (three replicas), one
    handle on SQLite (the single-node database)."""
    handles: list[Database]
    if request.param == "sqlite":
        handles = [SqliteDatabase(tmp_path / "hub.db")]
    else:
        url = request.getfixturevalue("fresh_postgres_url")
        handles = [PostgresDatabase(url, max_connections=4) for _ in range(3)]
    for db in handles:
        await db.connect()
    await handles[0].migrate()
    yield handles
    for db in handles:
        await db.close()


async def test_concurrent_publishes_never_pass_the_version_limit(databases: list[Database]) -> None:
    limited = registry(max_versions_per_user=5)
    outcomes: list[str] = []

    async def publish(i: int) -> None:
        db = databases[i % len(databases)]
        try:
            async with db.transaction() as conn:
                await consume(conn, limited, "alice", 10)
                await asyncio.sleep(0.01)  # hold the row while others queue on it
        except QuotaExceeded:
            outcomes.append("refused")
        else:
            outcomes.append("ok")

    await asyncio.gather(*(publish(i) for i in range(20)))
    assert outcomes.count("ok") == 5
    assert outcomes.count("refused") == 15
    assert await usage(databases[0]) == (50, 5)


async def test_failed_publish_leaves_usage_unchanged(databases: list[Database]) -> None:
    db = databases[0]
    limited = registry(max_versions_per_user=2)
    async with db.transaction() as conn:
        await consume(conn, limited, "alice", 100)

    class StorageFailed(Exception):
        pass

    with pytest.raises(StorageFailed):
        async with db.transaction() as conn:
            await consume(conn, limited, "alice", 300)
            raise StorageFailed
    assert await usage(db) == (100, 1)
    # The rolled-back publish did not use up the second slot.
    async with db.transaction() as conn:
        assert await consume(conn, limited, "alice", 1) is None
    assert await usage(db) == (101, 2)


async def test_block_refuses_with_a_message_naming_user_registry_and_limits(databases: list[Database]) -> None:
    db = databases[0]
    limited = registry(max_versions_per_user=1)
    async with db.transaction() as conn:
        await consume(conn, limited, "alice", 1)
    with pytest.raises(QuotaExceeded) as info:
        async with db.transaction() as conn:
            await consume(conn, limited, "alice", 1)
    assert info.value.status == 403
    assert "'alice'" in info.value.message and "'npm'" in info.value.message
    assert "1 versions" in info.value.message


async def test_bytes_limit(databases: list[Database]) -> None:
    db = databases[0]
    limited = registry(max_bytes_per_user=100)
    async with db.transaction() as conn:
        await consume(conn, limited, "alice", 60)
    with pytest.raises(QuotaExceeded):
        async with db.transaction() as conn:
            await consume(conn, limited, "alice", 41)
    async with db.transaction() as conn:
        await consume(conn, limited, "alice", 40)  # exactly at the limit is allowed
    assert await usage(db) == (100, 2)


async def test_warn_enforcement_returns_a_warning_and_counts(databases: list[Database]) -> None:
    db = databases[0]
    warned = registry(max_versions_per_user=1, enforcement="warn")
    async with db.transaction() as conn:
        assert await consume(conn, warned, "alice", 5) is None
    async with db.transaction() as conn:
        warning = await consume(conn, warned, "alice", 5)
    assert warning is not None and "quota exceeded" in warning
    assert await usage(db) == (10, 2)


async def test_no_quota_is_unlimited_but_still_counted(databases: list[Database]) -> None:
    db = databases[0]
    unlimited = registry()
    for _ in range(3):
        async with db.transaction() as conn:
            assert await consume(conn, unlimited, "alice", 2**40) is None
    assert await usage(db) == (3 * 2**40, 3)


async def test_users_and_registries_are_counted_separately(databases: list[Database]) -> None:
    db = databases[0]
    limited = registry(max_versions_per_user=1)
    async with db.transaction() as conn:
        await consume(conn, limited, "alice", 1)
        await consume(conn, limited, "bob", 2)
    assert await usage(db, "alice") == (1, 1)
    assert await usage(db, "bob") == (2, 1)
    assert await usage(db, "alice", "other") == (0, 0)


async def test_release_gives_back_but_never_below_zero(databases: list[Database]) -> None:
    db = databases[0]
    limited = registry(max_versions_per_user=1)
    async with db.transaction() as conn:
        await consume(conn, limited, "alice", 50)
    async with db.transaction() as conn:
        await release(conn, "npm", "alice", 50)
    assert await usage(db) == (0, 0)
    async with db.transaction() as conn:
        await release(conn, "npm", "alice", 50)
    assert await usage(db) == (0, 0)
    async with db.transaction() as conn:
        assert await consume(conn, limited, "alice", 1) is None  # the slot is free again
