"""Authentication and permissions: how clients present tokens (Bearer, and Basic as npm sends it),
config and database tokens, the first-start admin token file, and the DESIGN §6 matrix."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batlehub.auth import (
    ANONYMOUS,
    Authenticator,
    Identity,
    check_permission,
    has_permission,
    token_from_header,
)
from batlehub.config import PERMISSIONS, Settings, parse_settings
from batlehub.db import Database, PostgresDatabase, SqliteDatabase
from batlehub.errors import Forbidden, StartupError, Unauthorized

CONFIG_ADMIN = "config-admin-token"
CONFIG_USER = "config-user-token"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- parsing the Authorization header ----------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer abc.def", "abc.def"),
        ("bearer   abc", "abc"),
        ("BEARER abc", "abc"),
        (basic("npm-user", "tok:with:colons"), "tok:with:colons"),
        (basic("", "just-a-token"), "just-a-token"),
    ],
)
def test_token_from_header(header: str | None, token: str | None) -> None:
    assert token_from_header(header) == token


@pytest.mark.parametrize(
    "header",
    [
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"no-colon-here").decode(),
        basic("user", ""),
        "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
        "Digest username=x",
        "Bearer",
    ],
)
def test_malformed_credentials_are_unauthorized(header: str) -> None:
    with pytest.raises(Unauthorized):
        token_from_header(header)


# --- tokens -----------------------------------------------------------------------------------------


def settings_with_tokens(tmp_path: Path) -> Settings:
    return parse_settings(
        {
            "registries": [],
            "auth": [
                {
                    "type": "token",
                    "tokens": [
                        {"value": CONFIG_ADMIN, "role": "admin", "user_id": "root"},
                        {
                            "value": "sha256:" + hashlib.sha256(CONFIG_USER.encode()).hexdigest().upper(),
                            "role": "user",
                            "user_id": "carol",
                        },
                    ],
                }
            ],
        },
        data_dir=tmp_path,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    database: Database
    if request.param == "sqlite":
        database = SqliteDatabase(tmp_path / "hub.db")
    else:
        database = PostgresDatabase(request.getfixturevalue("fresh_postgres_url"), max_connections=3)
    await database.connect()
    await database.migrate()
    yield database
    await database.close()


async def test_config_tokens_plaintext_and_sha256(tmp_path: Path, db: Database) -> None:
    auth = Authenticator(settings_with_tokens(tmp_path), db)
    assert await auth.authenticate(f"Bearer {CONFIG_ADMIN}") == Identity("root", "admin")
    assert await auth.authenticate(basic("carol", CONFIG_USER)) == Identity("carol", "user")
    assert await auth.authenticate(None) is ANONYMOUS
    with pytest.raises(Unauthorized):
        await auth.authenticate("Bearer not-a-known-token")
    # The sha256: entry authenticates its plaintext, not the hash itself.
    with pytest.raises(Unauthorized):
        await auth.authenticate("Bearer " + hashlib.sha256(CONFIG_USER.encode()).hexdigest())


async def test_database_tokens_create_list_revoke(tmp_path: Path, db: Database) -> None:
    auth = Authenticator(parse_settings({"registries": []}, data_dir=tmp_path), db)
    record, token = await auth.create_token("dave", "user", None, "ci")
    assert token.startswith("bh_") and len(token) > 30
    identity = await auth.authenticate(f"Bearer {token}")
    assert identity == Identity("dave", "user", record["id"])

    listed = await auth.list_tokens()
    assert [t["id"] for t in listed] == [record["id"]]
    assert listed[0]["user_id"] == "dave" and listed[0]["description"] == "ci"
    assert token not in repr(listed)
    assert hashlib.sha256(token.encode()).hexdigest() not in repr(listed)
    # Nothing but the hash is stored.
    assert await db.fetchval("SELECT COUNT(*) FROM tokens WHERE token_hash = $1", token) == 0

    await auth.touch(identity)
    assert (await auth.list_tokens())[0]["last_used"] is not None

    assert await auth.revoke_token(record["id"]) is True
    assert await auth.revoke_token(record["id"]) is False
    assert await auth.list_tokens() == []
    with pytest.raises(Unauthorized):
        await auth.authenticate(f"Bearer {token}")


async def test_a_token_revokes_itself_and_nothing_else(tmp_path: Path, db: Database) -> None:
    auth = Authenticator(parse_settings({"registries": []}, data_dir=tmp_path), db)
    _, token = await auth.create_token("erin", "user")
    _, other = await auth.create_token("erin", "user")
    erin = await auth.identify(token)
    assert erin is not None
    assert await auth.revoke_presented(erin, other) is False  # presenting one token, naming another
    assert await auth.revoke_presented(erin, token) is True
    assert await auth.identify(token) is None and await auth.identify(other) is not None


async def test_expired_token_is_refused(tmp_path: Path, db: Database) -> None:
    auth = Authenticator(parse_settings({"registries": []}, data_dir=tmp_path), db)
    record, token = await auth.create_token("frank", "user", expires_in_days=1)
    assert record["expires"] == pytest.approx(time.time() + 86400, abs=60)
    assert await auth.identify(token) is not None
    await db.execute("UPDATE tokens SET expires = $1 WHERE id = $2", time.time() - 1, record["id"])
    assert await auth.identify(token) is None
    with pytest.raises(Unauthorized):
        await auth.authenticate(f"Bearer {token}")


async def test_first_start_admin_token_file(tmp_path: Path, db: Database) -> None:
    data_dir = tmp_path / "data"
    auth = Authenticator(parse_settings({"registries": []}, data_dir=data_dir), db)
    path = await auth.ensure_first_start_token(data_dir)
    assert path == data_dir / "admin.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert (await auth.authenticate(f"Bearer {token}")).role == "admin"
    # Only its hash is in the database.
    assert await db.fetchval("SELECT COUNT(*) FROM tokens WHERE token_hash = $1", token) == 0

    # The next start (same database) creates nothing and leaves the file alone.
    again = Authenticator(parse_settings({"registries": []}, data_dir=data_dir), db)
    assert await again.ensure_first_start_token(data_dir) is None
    assert path.read_text().strip() == token
    assert await db.fetchval("SELECT COUNT(*) FROM tokens") == 1


async def test_revoked_first_start_token_stays_revoked(tmp_path: Path, db: Database) -> None:
    data_dir = tmp_path / "data"
    auth = Authenticator(parse_settings({"registries": []}, data_dir=data_dir), db)
    token = (await auth.ensure_first_start_token(data_dir)).read_text().strip()  # type: ignore[union-attr]
    (record,) = await auth.list_tokens()
    assert await auth.revoke_token(record["id"])
    # A restart must not hand out a fresh admin token the operator did not ask for.
    assert await auth.ensure_first_start_token(data_dir) is None
    assert (data_dir / "admin.token").read_text().strip() == token
    with pytest.raises(Unauthorized):
        await auth.authenticate(f"Bearer {token}")


async def test_replicas_starting_together_create_one_first_start_token(tmp_path: Path, db: Database) -> None:
    replicas = [Authenticator(parse_settings({"registries": []}, data_dir=tmp_path / f"r{i}"), db) for i in range(3)]
    paths = await asyncio.gather(*(a.ensure_first_start_token(tmp_path / f"r{i}") for i, a in enumerate(replicas)))
    assert len([p for p in paths if p is not None]) == 1
    assert await db.fetchval("SELECT COUNT(*) FROM tokens") == 1


async def test_first_start_token_in_an_unwritable_place(tmp_path: Path, db: Database) -> None:
    (tmp_path / "afile").write_text("")
    blocked = tmp_path / "afile" / "data"
    auth = Authenticator(parse_settings({"registries": []}, data_dir=blocked), db)
    with pytest.raises(StartupError, match="cannot write the first-start admin token to"):
        await auth.ensure_first_start_token(blocked)
    # No token that nobody can read was left behind: the next start with a usable directory makes one.
    assert await db.fetchval("SELECT COUNT(*) FROM tokens") == 0
    assert await auth.ensure_first_start_token(tmp_path / "data") == tmp_path / "data" / "admin.token"


async def test_no_first_start_token_when_tokens_are_configured(tmp_path: Path, db: Database) -> None:
    auth = Authenticator(settings_with_tokens(tmp_path), db)
    assert await auth.ensure_first_start_token(tmp_path) is None
    assert not (tmp_path / "admin.token").exists()


# --- the permission matrix (DESIGN §6) ----------------------------------------------------------


def default_registry():  # type: ignore[no-untyped-def]
    return parse_settings({"registries": [{"type": "npm", "name": "npm"}]}).registries[0]


ANON = ANONYMOUS
USER = Identity("u", "user")
ADMIN = Identity("a", "admin")

# role -> permissions granted by the default RBAC of a registry
MATRIX = {
    ANON: {"releases:read", "source:read"},
    USER: {"releases:read", "source:read", "releases:publish"},
    ADMIN: {"releases:read", "source:read", "releases:publish", "releases:delete"},
}


@pytest.mark.parametrize("identity", [ANON, USER, ADMIN], ids=["anonymous", "user", "admin"])
@pytest.mark.parametrize("permission", [p for p in PERMISSIONS if p != "*"])
def test_permission_matrix(identity: Identity, permission: str) -> None:
    registry = default_registry()
    allowed = permission in MATRIX[identity]
    assert has_permission(identity, registry, permission) is allowed
    if allowed:
        check_permission(identity, registry, permission)
        return
    expected = Unauthorized if identity.anonymous else Forbidden
    with pytest.raises(expected) as info:
        check_permission(identity, registry, permission)
    assert info.value.status == (401 if identity.anonymous else 403)
    assert "'npm'" in info.value.message
    if identity.anonymous:  # npm re-sends with credentials only after a challenge
        assert "WWW-Authenticate" in info.value.headers


def test_private_registry_refuses_anonymous_read_but_not_users() -> None:
    private = parse_settings({"registries": [{"type": "npm", "name": "private", "rbac": {"anonymous": []}}]})
    registry = private.registries[0]
    with pytest.raises(Unauthorized):
        check_permission(ANON, registry, "releases:read")
    check_permission(USER, registry, "releases:read")
