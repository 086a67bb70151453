"""The contract every registry format keeps, run against a real app with the format's own protocol.

A format's test suite subclasses `RegistryFormatContract` and says how its clients publish, read
and unpublish (the adapter methods below); the tests then check what core promises for every
format: the format's config model accepts its `registry_options` and refuses unknown keys, a
publish is readable at once, a version is published once, only owners change a package and only
scope owners publish new names in a scope, quotas hold under concurrency, every write is audited,
`on_publish`/`on_unpublish` fire once, after the commit. They run on SQLite and on a real
PostgreSQL::

    class TestMyFormatContract(RegistryFormatContract):
        registry_type = "myformat"

        def package_name(self, stem: str) -> str: ...
        async def publish(self, client, registry, token, name, version) -> int: ...
        async def versions(self, client, registry, name) -> list[str] | None: ...
        async def unpublish(self, client, registry, token, name, version) -> int: ...
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar

import pluggy
import pytest
from aiohttp.test_utils import TestClient

from batlehub import appkeys
from batlehub.app import create_app, validate_config
from batlehub.config import parse_settings
from batlehub.errors import ConfigError
from batlehub.interfaces import RegistryFormatType
from batlehub.plugins import flatten, get_plugin_manager, hookimpl

ADMIN = "contract-admin-token-0123456789"
ALICE = "contract-alice-token-0123456789"
BOB = "contract-bob-token-0123456789"
LOCAL = "local"
"""A local registry whose users may publish and unpublish (so refusals are ownership's)."""
QUOTA = "quota"
"""A local registry where each user may keep at most `QUOTA_VERSIONS` versions."""
QUOTA_VERSIONS = 3


class EventRecorder:
    """A plugin that records `on_publish`/`on_unpublish`, and what a reader saw when each fired."""

    def __init__(self) -> None:
        self.app: Any = None
        self.published: list[tuple[str, str, str, str | None, bool]] = []
        self.unpublished: list[tuple[str, str, str | None]] = []

    @hookimpl
    async def on_publish(self, registry: str, package: str, version: str, user_id: str | None, size: int) -> None:
        loaded = await self.app[appkeys.REGISTRY_SERVICES][registry].packages.load(package)
        visible = loaded is not None and loaded.version(version) is not None
        self.published.append((registry, package, version, user_id, visible))

    @hookimpl
    async def on_unpublish(self, registry: str, package: str, version: str | None, user_id: str | None) -> None:
        self.unpublished.append((registry, package, version))


class RegistryFormatContract:
    """Subclass, set `registry_type`, implement the adapter methods."""

    registry_type: ClassVar[str]
    duplicate_publish_status: ClassVar[int] = 409
    """The status a second publish of a published version gets. A format whose clients expect
    another one says so: PyPI answers 400 "File already exists", which twine recognises."""

    # --- the adapter a format provides ----------------------------------------------------------

    def registry_options(self) -> dict[str, Any]:
        """The format's own keys for a local registry."""
        return {"mode": "local"}

    def package_name(self, stem: str) -> str:
        """A valid new package name built from `stem` (lowercase letters, digits and dashes)."""
        raise NotImplementedError

    def scoped_name(self, scope: str, stem: str) -> str | None:
        """A package name inside `scope` (e.g. npm's `@scope/stem`), or None: no scopes here."""
        return None

    async def publish(self, client: TestClient, registry: str, token: str, name: str, version: str) -> int:
        """Publish `name@version` the way the format's client does; return the HTTP status."""
        raise NotImplementedError

    async def versions(self, client: TestClient, registry: str, name: str) -> list[str] | None:
        """The versions a client can see (anonymous read), or None when the package is unknown."""
        raise NotImplementedError

    async def unpublish(self, client: TestClient, registry: str, token: str, name: str, version: str) -> int:
        """Remove one version the way the format's client does; return the HTTP status of the
        request that decides (an ownership refusal must show there)."""
        raise NotImplementedError

    # --- fixtures -------------------------------------------------------------------------------

    @pytest.fixture(params=["sqlite", "postgresql"])
    def database(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        if request.param == "postgresql":
            return {"type": "postgresql", "url": request.getfixturevalue("fresh_postgres_url")}
        return {"type": "sqlite"}

    @pytest.fixture
    def events(self) -> EventRecorder:
        return EventRecorder()

    @pytest.fixture
    async def client(
        self, aiohttp_client: Callable[..., Any], tmp_path: Path, database: dict[str, Any], events: EventRecorder
    ) -> AsyncIterator[TestClient]:
        tokens = [
            {"value": ADMIN, "role": "admin", "user_id": "admin"},
            {"value": ALICE, "role": "user", "user_id": "alice"},
            {"value": BOB, "role": "user", "user_id": "bob"},
        ]
        every = ["releases:read", "source:read", "releases:publish", "releases:delete"]
        raw = {
            "database": database,
            "auth": [{"type": "token", "tokens": tokens}],
            "registries": [
                {"type": self.registry_type, "name": LOCAL, "rbac": {"user": every}, **self.registry_options()},
                {
                    "type": self.registry_type,
                    "name": QUOTA,
                    "quota": {"max_versions_per_user": QUOTA_VERSIONS},
                    **self.registry_options(),
                },
            ],
        }
        pm: pluggy.PluginManager = get_plugin_manager()
        pm.register(events, name="contract-events")
        app = create_app(parse_settings(raw, data_dir=tmp_path / "data"), pm=pm)
        events.app = app
        yield await aiohttp_client(app)

    def unique(self, stem: str) -> str:
        return self.package_name(f"{stem}-{uuid.uuid4().hex[:8]}")

    async def admin(self, client: TestClient, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with client.request(method, path, json=body, headers={"Authorization": f"Bearer {ADMIN}"}) as response:
            return response.status, await response.json()

    # --- the contract ---------------------------------------------------------------------------

    def format_type(self) -> RegistryFormatType:
        found = flatten(get_plugin_manager().hook.register_registry_formats())
        return next(f for f in found if f.name == self.registry_type)

    def test_config_model_accepts_the_registry_options(self) -> None:
        fmt = self.format_type()
        entry = {"type": self.registry_type, "name": LOCAL, **self.registry_options()}
        assert isinstance(validate_config(fmt, entry, path="registries[0]"), fmt.config_model)

    def test_config_model_refuses_unknown_keys(self) -> None:
        fmt = self.format_type()
        entry = {"type": self.registry_type, "name": LOCAL, **self.registry_options(), "no_such_key": 1}
        with pytest.raises(ConfigError) as info:
            validate_config(fmt, entry, path="registries[0]")
        (problem,) = info.value.problems
        assert problem.startswith(f"registries[0].no_such_key: unknown key for type {self.registry_type!r}"), problem

    async def test_a_publish_is_readable_at_once_and_a_version_is_published_once(self, client: TestClient) -> None:
        name = self.unique("first")
        assert await self.versions(client, LOCAL, name) is None
        assert await self.publish(client, LOCAL, ALICE, name, "1.0.0") in (200, 201)
        assert await self.versions(client, LOCAL, name) == ["1.0.0"]
        assert await self.publish(client, LOCAL, ALICE, name, "1.0.0") == self.duplicate_publish_status
        assert await self.publish(client, LOCAL, ALICE, name, "1.1.0") in (200, 201)
        assert sorted(await self.versions(client, LOCAL, name) or []) == ["1.0.0", "1.1.0"]

    async def test_only_owners_change_a_package(self, client: TestClient) -> None:
        name = self.unique("owned")
        assert await self.publish(client, LOCAL, ALICE, name, "1.0.0") in (200, 201)
        assert await self.publish(client, LOCAL, BOB, name, "1.1.0") == 403
        assert await self.unpublish(client, LOCAL, BOB, name, "1.0.0") == 403
        assert await self.versions(client, LOCAL, name) == ["1.0.0"]
        status, body = await self.admin(client, "GET", f"/api/v1/admin/registries/{LOCAL}/owners/{name}")
        assert status == 200 and body["owners"] == ["alice"]

        # An admin may change any package, and may add owners.
        assert await self.publish(client, LOCAL, ADMIN, name, "1.1.0") in (200, 201)
        status, _ = await self.admin(
            client, "PUT", f"/api/v1/admin/registries/{LOCAL}/owners/{name}", {"owners": ["alice", "bob"]}
        )
        assert status == 200
        assert await self.publish(client, LOCAL, BOB, name, "1.2.0") in (200, 201)
        assert await self.unpublish(client, LOCAL, BOB, name, "1.0.0") in (200, 201)
        assert sorted(await self.versions(client, LOCAL, name) or []) == ["1.1.0", "1.2.0"]

    async def test_a_name_assigned_by_an_admin_is_published_by_its_owners_only(self, client: TestClient) -> None:
        name = self.unique("assigned")
        status, _ = await self.admin(
            client, "PUT", f"/api/v1/admin/registries/{LOCAL}/owners/{name}", {"owners": ["bob"]}
        )
        assert status == 200
        assert await self.publish(client, LOCAL, ALICE, name, "1.0.0") == 403
        assert await self.publish(client, LOCAL, BOB, name, "1.0.0") in (200, 201)

    async def test_a_scope_belongs_to_its_first_publisher(self, client: TestClient) -> None:
        scope = f"s{uuid.uuid4().hex[:8]}"
        first = self.scoped_name(scope, "first")
        if first is None:
            pytest.skip(f"the {self.registry_type} format has no scopes")
        assert await self.publish(client, LOCAL, ALICE, first, "1.0.0") in (200, 201)
        other = self.scoped_name(scope, "other")
        assert other is not None
        assert await self.publish(client, LOCAL, BOB, other, "1.0.0") == 403
        assert await self.versions(client, LOCAL, other) is None
        assert await self.publish(client, LOCAL, ALICE, other, "1.0.0") in (200, 201)

    async def test_quota_holds_under_concurrent_publishes(self, client: TestClient) -> None:
        name = self.unique("quota")
        versions = [f"1.0.{i}" for i in range(8)]
        statuses = await asyncio.gather(*(self.publish(client, QUOTA, ALICE, name, v) for v in versions))
        assert sorted(statuses).count(403) == len(versions) - QUOTA_VERSIONS, statuses
        assert len(await self.versions(client, QUOTA, name) or []) == QUOTA_VERSIONS
        status, usage = await self.admin(client, "GET", f"/api/v1/admin/quota/{QUOTA}/alice")
        assert status == 200 and usage["used_versions"] == QUOTA_VERSIONS

    async def test_concurrent_publishes_of_one_version_make_one_version(self, client: TestClient) -> None:
        name = self.unique("race")
        assert await self.publish(client, LOCAL, ALICE, name, "0.1.0") in (200, 201)
        statuses = await asyncio.gather(*(self.publish(client, LOCAL, ALICE, name, "1.0.0") for _ in range(8)))
        duplicate = self.duplicate_publish_status
        assert sum(1 for s in statuses if s in (200, 201)) == 1 and statuses.count(duplicate) == 7, statuses
        distinct = await asyncio.gather(*(self.publish(client, LOCAL, ALICE, name, f"2.0.{i}") for i in range(8)))
        assert all(s in (200, 201) for s in distinct), distinct
        assert len(await self.versions(client, LOCAL, name) or []) == 10

    async def test_every_write_is_audited_and_announced_once_after_the_commit(
        self, client: TestClient, events: EventRecorder
    ) -> None:
        name = self.unique("events")
        assert await self.publish(client, LOCAL, ALICE, name, "1.0.0") in (200, 201)
        assert await self.publish(client, LOCAL, ALICE, name, "1.0.0") == self.duplicate_publish_status  # no event
        assert await self.publish(client, LOCAL, BOB, name, "2.0.0") == 403  # refused: no event
        assert await self.publish(client, LOCAL, ALICE, name, "1.1.0") in (200, 201)
        mine = [e for e in events.published if e[1] == name]
        assert mine == [
            (LOCAL, name, "1.0.0", "alice", True),
            (LOCAL, name, "1.1.0", "alice", True),
        ], "on_publish fires once per version, after the version is visible"

        assert await self.unpublish(client, LOCAL, ALICE, name, "1.0.0") in (200, 201)
        assert (LOCAL, name, "1.0.0") in events.unpublished
        assert await self.versions(client, LOCAL, name) == ["1.1.0"]

        status, log = await self.admin(client, "GET", f"/api/v1/admin/audit-log?registry={LOCAL}&limit=1000")
        assert status == 200
        entries = [e for e in log["entries"] if name in (e["target"] or "")]
        actions = [(e["action"], e["user_id"], e["result"]) for e in reversed(entries)]
        publish, unpublish = f"{self.registry_type}.publish", f"{self.registry_type}.unpublish"
        assert [a for a in actions if a[2] == "ok"] == [
            (publish, "alice", "ok"),
            (publish, "alice", "ok"),
            (unpublish, "alice", "ok"),
        ], actions
        assert any(a[2] == "denied" and a[1] == "bob" for a in actions), "the refused write is audited too"
