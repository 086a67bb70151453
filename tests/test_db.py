"""The database layer, the same tests on SQLite and on a real PostgreSQL: migrations applied exactly
once (also by replicas starting together), transactions, `$N` placeholders, RETURNING, and a
clear one-line failure when PostgreSQL cannot be reached."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batlehub.db import MIGRATIONS, Database, PostgresDatabase, SqliteDatabase, schema_version
from batlehub.errors import StartupError
from batlehub.testing.services import free_port

LATEST = MIGRATIONS[-1][0]


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """An unmigrated, connected database of either dialect."""
    db: Database
    if request.param == "sqlite":
        db = SqliteDatabase(tmp_path / "hub.db")
    else:
        db = PostgresDatabase(request.getfixturevalue("fresh_postgres_url"), max_connections=5)
    await db.connect()
    yield db
    await db.close()


async def _scratch_table(db: Database) -> None:
    await db.execute("CREATE TABLE scratch (id INTEGER PRIMARY KEY, a TEXT NOT NULL, b TEXT)")


async def test_migrate_twice_applies_once(database: Database) -> None:
    messages: list[str] = []
    first = await database.migrate(progress=messages.append)
    assert first == [m[0] for m in MIGRATIONS]
    assert len(messages) == len(MIGRATIONS)
    assert messages[0].startswith("migration 1 (1/")
    assert await database.migrate() == []
    assert await schema_version(database) == LATEST
    rows = await database.fetch("SELECT version FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in rows] == [m[0] for m in MIGRATIONS]
    # The tables of migration 1 exist and are usable.
    await database.execute(
        "INSERT INTO quota_usage (registry, user_id, bytes, versions) VALUES ($1, $2, $3, $4)", "npm", "u", 5, 1
    )
    assert await database.fetchval("SELECT bytes FROM quota_usage WHERE user_id = $1", "u") == 5


async def test_replicas_migrating_together_apply_each_migration_once(fresh_postgres_url: str) -> None:
    replicas = [PostgresDatabase(fresh_postgres_url, max_connections=2) for _ in range(3)]
    await asyncio.gather(*(r.connect() for r in replicas))
    try:
        results = await asyncio.gather(*(r.migrate() for r in replicas))
        applied = sorted(v for result in results for v in result)
        assert applied == [m[0] for m in MIGRATIONS], results
        rows = await replicas[0].fetch("SELECT version, COUNT(*) AS n FROM schema_migrations GROUP BY version")
        assert {r["version"]: r["n"] for r in rows} == {m[0]: 1 for m in MIGRATIONS}
    finally:
        await asyncio.gather(*(r.close() for r in replicas))


async def test_sqlite_processes_migrating_together_apply_once(tmp_path: Path) -> None:
    """Two SQLite handles on one file (two local processes) queue on BEGIN IMMEDIATE."""
    handles = [SqliteDatabase(tmp_path / "shared.db") for _ in range(2)]
    for h in handles:
        await h.connect()
    try:
        results = await asyncio.gather(*(h.migrate() for h in handles))
        assert sorted(v for r in results for v in r) == [m[0] for m in MIGRATIONS]
    finally:
        for h in handles:
            await h.close()


async def test_transaction_commits_on_success(database: Database) -> None:
    await _scratch_table(database)
    async with database.transaction() as conn:
        await conn.execute("INSERT INTO scratch (id, a) VALUES ($1, $2)", 1, "x")
        assert await conn.fetchval("SELECT a FROM scratch WHERE id = $1", 1) == "x"
    assert await database.fetchval("SELECT COUNT(*) FROM scratch") == 1


async def test_transaction_rollback_leaves_nothing(database: Database) -> None:
    await _scratch_table(database)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with database.transaction() as conn:
            await conn.execute("INSERT INTO scratch (id, a) VALUES ($1, $2)", 1, "x")
            await conn.execute("INSERT INTO scratch (id, a) VALUES ($1, $2)", 2, "y")
            raise Boom
    assert await database.fetchval("SELECT COUNT(*) FROM scratch") == 0
    # The database is usable afterwards (no transaction left open on the connection).
    await database.execute("INSERT INTO scratch (id, a) VALUES ($1, $2)", 3, "z")
    assert await database.fetchval("SELECT COUNT(*) FROM scratch") == 1


async def test_database_shortcut_inside_a_transaction_does_not_hang(database: Database) -> None:
    # On SQLite a statement through the Database (not the transaction's connection) inside the same
    # task's transaction used to wait for its own lock forever.
    await _scratch_table(database)
    async with database.transaction() as conn:
        await conn.execute("INSERT INTO scratch (id, a) VALUES ($1, $2)", 1, "x")
        await asyncio.wait_for(database.fetchval("SELECT COUNT(*) FROM scratch"), 5)
    # Other tasks still wait for the transaction instead of interleaving with it.
    order: list[str] = []

    async def writer() -> None:
        async with database.transaction() as tx:
            order.append("tx-begin")
            await asyncio.sleep(0.05)
            await tx.execute("INSERT INTO scratch (id, a) VALUES ($1, $2)", 2, "y")
            order.append("tx-end")

    async def reader() -> None:
        await asyncio.sleep(0.01)
        await database.fetchval("SELECT COUNT(*) FROM scratch")
        order.append("read")

    await asyncio.gather(writer(), reader())
    if database.dialect == "sqlite":
        assert order == ["tx-begin", "tx-end", "read"]
    assert await database.fetchval("SELECT COUNT(*) FROM scratch") == 2


async def test_failed_statement_rolls_back_the_whole_transaction(database: Database) -> None:
    await _scratch_table(database)
    with pytest.raises(Exception):  # noqa: B017 - each driver raises its own constraint error
        async with database.transaction() as conn:
            await conn.execute("INSERT INTO scratch (id, a) VALUES ($1, $2)", 1, "x")
            await conn.execute("INSERT INTO scratch (id, a) VALUES ($1, $2)", 1, "duplicate")
    assert await database.fetchval("SELECT COUNT(*) FROM scratch") == 0


async def test_placeholders_reused_and_out_of_order(database: Database) -> None:
    await _scratch_table(database)
    changed = await database.execute("INSERT INTO scratch (id, a, b) VALUES ($2, $1, $1)", "same", 7)
    assert changed == 1
    row = await database.fetchrow("SELECT id, a, b FROM scratch WHERE a = $1 AND b = $1 AND id = $2", "same", 7)
    assert row == {"id": 7, "a": "same", "b": "same"}
    # Ten or more parameters: $1 must not swallow the 1 of $10.
    values = [f"v{i}" for i in range(1, 11)]
    sql = "SELECT " + ", ".join(f"${i} AS c{i}" for i in range(10, 0, -1))
    if database.dialect == "postgresql":
        sql = "SELECT " + ", ".join(f"${i}::text AS c{i}" for i in range(10, 0, -1))
    row = await database.fetchrow(sql, *values)
    assert row is not None
    assert row["c10"] == "v10" and row["c1"] == "v1"


async def test_returning_and_row_counts(database: Database) -> None:
    await _scratch_table(database)
    async with database.transaction() as conn:
        row = await conn.fetchrow("INSERT INTO scratch (id, a) VALUES ($1, $2) RETURNING id, a", 5, "five")
        assert row == {"id": 5, "a": "five"}
        await conn.execute("INSERT INTO scratch (id, a) VALUES ($1, $2)", 6, "six")
        assert await conn.execute("UPDATE scratch SET b = $1", "both") == 2
        assert await conn.fetchrow("UPDATE scratch SET b = $1 WHERE id = $2 RETURNING b", "x", 99) is None
    assert await database.execute("DELETE FROM scratch WHERE id = $1", 5) == 1
    assert await database.fetch("SELECT id FROM scratch ORDER BY id") == [{"id": 6}]
    assert await database.fetchval("SELECT a FROM scratch WHERE id = $1", 404) is None


async def test_on_conflict_is_portable(database: Database) -> None:
    await _scratch_table(database)
    for value in ("first", "second"):
        await database.execute(
            "INSERT INTO scratch (id, a) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET a = excluded.a", 1, value
        )
    assert await database.fetchval("SELECT a FROM scratch WHERE id = $1", 1) == "second"


async def test_ping(database: Database) -> None:
    await database.ping()


# --- unreachable PostgreSQL --------------------------------------------------------------------------


async def test_unreachable_postgres_is_one_clear_startup_error() -> None:
    port = free_port()
    db = PostgresDatabase(f"postgresql://batlehub:s3cret@127.0.0.1:{port}/hub")
    with pytest.raises(StartupError) as info:
        await db.connect()
    message = str(info.value)
    assert message.startswith(f"cannot connect to PostgreSQL at postgresql://batlehub:***@127.0.0.1:{port}/hub")
    assert "\n" not in message
    assert "s3cret" not in message


def test_serve_with_unreachable_postgres_exits_1_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "hub.toml"
    config.write_text(
        f'registries = []\n[server]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'[database]\ntype = "postgresql"\nurl = "postgresql://postgres@127.0.0.1:{port}/hub"\n'
        f'[storage]\npath = "{tmp_path / "blobs"}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATLEHUB_")}
    env["BATLEHUB_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "batlehub", "serve", "--config", str(config), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("batlehub:")]
    assert lines == [lines[0]] and lines[0].startswith("batlehub: cannot connect to PostgreSQL at "), result.stderr
    assert f"127.0.0.1:{port}" in lines[0]


# --- unusable SQLite path ---------------------------------------------------------------------------


async def test_sqlite_path_blocked_by_a_file_is_one_clear_startup_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    db = SqliteDatabase(tmp_path / "afile" / "sub" / "hub.db")
    with pytest.raises(StartupError, match=r"cannot open the SQLite database at .*afile/sub/hub\.db"):
        await db.connect()


async def test_sqlite_file_that_is_not_a_database_is_one_clear_startup_error(tmp_path: Path) -> None:
    (tmp_path / "hub.db").write_text("this is not a database, just some text " * 200)
    db = SqliteDatabase(tmp_path / "hub.db")
    with pytest.raises(StartupError, match=r"cannot open the SQLite database at .*hub\.db"):
        await db.connect()


def test_migrate_with_an_unusable_data_dir_exits_1_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATLEHUB_")}
    env["BATLEHUB_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "batlehub", "migrate", "--data-dir", str(tmp_path / "afile" / "sub")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("batlehub: cannot open the SQLite database at ")


async def test_upstream_documents_stored_before_migration_5_get_their_size_and_last_use(
    database: Database,
) -> None:
    """Retention sizes and orders copies fetched before it existed by what the rows already say."""
    from batlehub.db import _apply_migrations

    saved = list(MIGRATIONS)
    MIGRATIONS[:] = [m for m in saved if m[0] < 5]
    try:
        await database.migrate()
    finally:
        MIGRATIONS[:] = saved
    await database.execute(
        "INSERT INTO upstream_documents (registry, name, variant, body, fetched) VALUES ('r', 'p', 'full', $1, 123.5)",
        b"h\n" + b"x" * 5000,
    )
    async with database.transaction() as conn:
        assert await _apply_migrations(conn, database.dialect, None) == [m[0] for m in MIGRATIONS if m[0] >= 5]
    row = await database.fetchrow("SELECT size, last_used, body_key FROM upstream_documents")
    assert row is not None
    assert (row["size"], row["last_used"], row["body_key"]) == (5002, 123.5, None)
