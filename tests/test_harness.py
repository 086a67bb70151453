"""The test harness gives working services: each fixture is exercised with a real client."""

from __future__ import annotations

import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import botocore.exceptions
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from batlehub.testing import hub as hub_module
from batlehub.testing.hub import Hub, HubStartError, serve_env
from batlehub.testing.nginx import Nginx
from batlehub.testing.services import (
    PORT_IN_USE,
    RedisServer,
    free_port,
    redis_ping,
    s3_client,
    scratch_dir,
    start_service,
)


async def test_postgres_answers_queries(postgres_url: str) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


# Names handed out by `fresh_postgres_url`, to check that they are dropped afterwards.
_FRESH_DATABASES: list[str] = []


async def test_fresh_postgres_database_is_empty_and_private(fresh_postgres_url: str) -> None:
    conn = await asyncpg.connect(fresh_postgres_url)
    try:
        tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        await conn.execute("CREATE TABLE only_here (id int)")
        name = await conn.fetchval("SELECT current_database()")
    finally:
        await conn.close()
    assert tables == 0
    assert name != "postgres"
    _FRESH_DATABASES.append(name)


async def test_fresh_postgres_database_is_dropped_after_the_test(postgres_url: str) -> None:
    if not _FRESH_DATABASES:
        pytest.skip("runs after test_fresh_postgres_database_is_empty_and_private")
    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname = ANY($1)", _FRESH_DATABASES)
    finally:
        await conn.close()
    assert rows == []


async def test_postgres_can_be_stopped_and_started_with_its_data(postgres_server: Any) -> None:
    table = f"harness_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(postgres_server.url)
    try:
        await conn.execute(f"CREATE TABLE {table} (id int); INSERT INTO {table} VALUES (7)")
    finally:
        await conn.close()
    postgres_server.stop()
    with pytest.raises(OSError):
        await asyncpg.connect(postgres_server.url, timeout=5)
    postgres_server.start()
    conn = await asyncpg.connect(postgres_server.url)
    try:
        assert await conn.fetchval(f"SELECT id FROM {table}") == 7
        await conn.execute(f"DROP TABLE {table}")
    finally:
        await conn.close()


async def test_redis_answers_ping(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        assert await client.ping() is True
        await client.set("harness", "ok")
        assert await client.get("harness") == b"ok"
    finally:
        await client.aclose()


async def test_redis_can_be_stopped_and_started_on_the_same_url(redis_server: Any) -> None:
    url = redis_server.url
    redis_server.stop()
    client = aioredis.from_url(url)
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
        redis_server.start()
        assert redis_server.url == url
        assert await client.ping() is True
    finally:
        await client.aclose()


@pytest.fixture
def redis_checked_at_teardown(redis_server: Any) -> Iterator[Any]:
    yield redis_server
    try:
        redis_ping(redis_server.port)
    except OSError as exc:
        pytest.fail(f"Redis was still stopped when the test's fixtures were torn down: {exc!r}")


def test_a_service_a_test_left_stopped_is_back_before_its_fixtures_are_torn_down(
    redis_checked_at_teardown: Any,
) -> None:
    redis_checked_at_teardown.stop()


def test_s3_stores_and_returns_objects(s3_config: dict[str, Any]) -> None:
    client = s3_client(s3_config)
    key = f"harness/{uuid.uuid4().hex}"
    client.put_object(Bucket=s3_config["bucket"], Key=key, Body=b"hello s3")
    body = client.get_object(Bucket=s3_config["bucket"], Key=key)["Body"].read()
    assert body == b"hello s3"
    assert s3_config["force_path_style"] is True


def test_s3_rejects_wrong_secret(s3_config: dict[str, Any]) -> None:
    # SeaweedFS checks signatures, unlike an in-process fake: a wrong key must be refused.
    client = s3_client({**s3_config, "secret_access_key": "wrong"})
    with pytest.raises(botocore.exceptions.ClientError, match=r"SignatureDoesNotMatch|AccessDenied"):
        client.put_object(Bucket=s3_config["bucket"], Key="harness/denied", Body=b"x")


def test_s3_objects_survive_a_restart(seaweedfs: Any, s3_config: dict[str, Any]) -> None:
    client = s3_client(s3_config)
    key = f"harness/{uuid.uuid4().hex}"
    client.put_object(Bucket=s3_config["bucket"], Key=key, Body=b"durable")
    seaweedfs.stop()
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        client.get_object(Bucket=s3_config["bucket"], Key=key)
    seaweedfs.start()
    assert client.get_object(Bucket=s3_config["bucket"], Key=key)["Body"].read() == b"durable"


async def test_hub_serves_health_and_writes_a_first_start_token(hub: Any) -> None:
    server = await hub("")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/api/v1/admin/health") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "ok"
    assert server.admin_token
    assert server.admin_token == (server.data_dir / "admin.token").read_text().strip()
    assert "listening on" in server.logs()


async def test_hub_stops_and_restarts_on_the_same_port_and_data(hub: Any) -> None:
    server = await hub("")
    url, token = server.url, server.admin_token
    await server.stop()
    assert not server.running
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server.port)) != 0
    await server.restart()
    assert server.url == url
    assert server.admin_token == token  # same data folder: no second first-start token
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/api/v1/admin/health") as response:
            assert response.status == 200


async def test_several_hubs_run_side_by_side(hub: Any, fresh_postgres_url: str) -> None:
    config = f'[database]\ntype = "postgresql"\nurl = "{fresh_postgres_url}"\n'
    first, second = await hub(config), await hub(config)
    assert first.port != second.port
    await first.kill()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{second.url}/api/v1/admin/health") as response:
            assert response.status == 200


async def test_hub_with_a_bad_config_exits_with_its_message(hub: Any) -> None:
    server = await hub("[server]\nworkers = 'many'\n", wait_for=None)
    assert await server.wait_exit() == 1
    assert "server.workers" in server.logs()


async def test_hub_that_cannot_start_fails_with_its_log(hub: Any) -> None:
    with pytest.raises(HubStartError, match=r"exited with code 1(.|\n)*server\.workers"):
        await hub("[server]\nworkers = 'many'\n")


def test_a_hub_started_without_an_event_loop_fails_with_its_log_too(tmp_path: Path) -> None:
    config = tmp_path / "batlehub.toml"
    config.write_text("[server]\nworkers = 'many'\n")
    log = tmp_path / "hub.log"
    server = Hub(config_path=config, data_dir=tmp_path / "data", log_path=log, port=free_port(), env=serve_env())
    with pytest.raises(HubStartError, match=r"exited with code 1(.|\n)*server\.workers"):
        server.start_blocking()


async def test_nginx_balances_hubs_with_the_shipped_config(hub: Any) -> None:
    first, second = await hub(""), await hub("")
    # Not tmp_path: nginx's workers may run as another user, who cannot enter pytest's folders.
    root = scratch_dir("nginx")
    nginx = Nginx.in_front_of(root / "nginx", [first.port, second.port])
    try:
        nginx.start()
        upstream = nginx.conf.read_text()
        assert f"server 127.0.0.1:{first.port} " in upstream and f"server 127.0.0.1:{second.port} " in upstream
        async with aiohttp.ClientSession() as session:
            for _ in range(4):
                async with session.get(f"{nginx.url}/api/v1/admin/health") as response:
                    assert response.status == 200
        await first.stop()
        async with aiohttp.ClientSession() as session:
            for _ in range(4):  # nginx retries the stopped one's share on the other
                async with session.get(f"{nginx.url}/api/v1/admin/health") as response:
                    assert response.status == 200
        assert len(nginx.access_log.read_text().splitlines()) == 8
    finally:
        nginx.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_service_whose_free_port_was_taken_meanwhile_starts_on_another(tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    made: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(made)}")
        if not made:
            server.port = taken  # as if another process grabbed it after free_port()
            server.process.argv[server.process.argv.index("--port") + 1] = str(taken)
        made.append(server)
        return server

    try:
        server = start_service(make)
        try:
            assert len(made) == 2
            assert server.port != taken
            assert redis_ping(server.port)
        finally:
            server.destroy()
    finally:
        blocker.close()


async def test_hub_on_a_taken_port_fails_and_on_a_free_one_retries(hub: Any, monkeypatch: Any) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        with pytest.raises(HubStartError, match=PORT_IN_USE):
            await hub("", port=taken)
        # When the port came from free_port() but was grabbed before the hub bound it: new port.
        ports = iter([taken])
        monkeypatch.setattr(hub_module, "free_port", lambda: next(ports, None) or free_port())
        server = await hub("")
        assert server.port != taken
        assert server.running
    finally:
        blocker.close()
