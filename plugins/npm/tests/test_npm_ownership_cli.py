"""End to end: package ownership with the real npm CLI against a real `batlehub serve`.

The first publisher of a name owns it; only owners (and admins) publish new versions, move
dist-tags, deprecate or unpublish; `npm owner add/rm/ls` manage the owners; a scope belongs to its
first publisher. Users here may unpublish (`releases:delete`), so every refusal below is
ownership's, not the role's.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from batlehub_npm_testing.clients import make_package, npm_env, ok, output, run_npm

from batlehub.testing.hub import Hub, HubFactory, token_auth_toml
from batlehub.testing.services import run_coroutine_sync

pytestmark = [pytest.mark.npm_cli]

ADMIN = "own-admin-token-0123456789"
ALICE = "own-alice-token-0123456789"
BOB = "own-bob-token-0123456789"

CONFIG = f"""
{token_auth_toml({"admin": (ADMIN, "admin"), "alice": (ALICE, "user"), "bob": (BOB, "user")})}

[[registries]]
type = "npm"
name = "npm"
mode = "local"
[registries.rbac]
user = ["releases:read", "source:read", "releases:publish", "releases:delete"]
"""


@pytest.fixture(scope="module")
def npm_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    factory = HubFactory(tmp_path_factory.mktemp("ownership-hub"))
    try:
        yield run_coroutine_sync(lambda: factory(CONFIG))
    finally:
        factory.stop_all()


@pytest.fixture
def registry(npm_hub: Hub) -> str:
    return f"{npm_hub.url}/registries/npm/"


def npm(tmp_path: Path, registry: str, token: str | None, *args: str, cwd: Path | None = None) -> Any:
    return run_npm(list(args), cwd=cwd or tmp_path, env=npm_env(tmp_path, registry, token))


def publish(tmp_path: Path, registry: str, token: str, name: str, version: str) -> Any:
    folder = make_package(tmp_path / "src" / uuid.uuid4().hex[:6], name, version)
    return npm(tmp_path, registry, token, "publish", cwd=folder)


def refused(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    text = output(result)
    assert result.returncode != 0 and "403" in text, text  # E403, or EOWNERMUTATE around a 403
    for needle in needles:
        assert needle in text, text


def view(tmp_path: Path, registry: str, spec: str, field: str) -> Any:
    return json.loads(ok(npm(tmp_path, registry, None, "view", spec, field, "--json")))


def test_only_owners_change_a_package_until_they_add_someone(tmp_path: Path, registry: str) -> None:
    name = f"pkg-a-{uuid.uuid4().hex[:6]}"
    ok(publish(tmp_path, registry, ALICE, name, "1.0.0"))
    assert ok(npm(tmp_path, registry, ALICE, "owner", "ls", name)).split() == ["alice", "<>"]

    # bob is a user with every permission, but not an owner.
    refused(publish(tmp_path, registry, BOB, name, "1.1.0"), "owned by alice")
    refused(npm(tmp_path, registry, BOB, "dist-tag", "add", f"{name}@1.0.0", "stable"), "owned by alice")
    refused(npm(tmp_path, registry, BOB, "deprecate", f"{name}@1.0.0", "mine now"), "owned by alice")
    refused(npm(tmp_path, registry, BOB, "unpublish", f"{name}@1.0.0", "--force"), "owned by alice")
    refused(npm(tmp_path, registry, BOB, "owner", "add", "bob", name), "owned by alice")
    assert view(tmp_path, registry, name, "versions") == ["1.0.0"]
    assert view(tmp_path, registry, name, "dist-tags") == {"latest": "1.0.0"}

    ok(npm(tmp_path, registry, ALICE, "owner", "add", "bob", name))
    owners = ok(npm(tmp_path, registry, BOB, "owner", "ls", name))
    assert [line.split()[0] for line in owners.splitlines()] == ["alice", "bob"]
    ok(publish(tmp_path, registry, BOB, name, "1.1.0"))
    ok(npm(tmp_path, registry, BOB, "dist-tag", "add", f"{name}@1.0.0", "stable"))
    assert view(tmp_path, registry, name, "dist-tags") == {"latest": "1.1.0", "stable": "1.0.0"}

    ok(npm(tmp_path, registry, ALICE, "owner", "rm", "bob", name))
    refused(publish(tmp_path, registry, BOB, name, "1.2.0"), "owned by alice")
    # npm itself refuses to remove the last owner; the hub would too.
    last = npm(tmp_path, registry, ALICE, "owner", "rm", "alice", name)
    assert last.returncode != 0 and "Cannot remove all owners" in output(last)
    # An owner may unpublish; an admin may change any package.
    ok(npm(tmp_path, registry, ADMIN, "deprecate", f"{name}@1.0.0", "use 1.1.0"))
    ok(npm(tmp_path, registry, ALICE, "unpublish", f"{name}@1.0.0"))
    assert view(tmp_path, registry, name, "versions") == ["1.1.0"]


def test_owner_add_needs_a_known_user(tmp_path: Path, registry: str) -> None:
    name = f"pkg-u-{uuid.uuid4().hex[:6]}"
    ok(publish(tmp_path, registry, ALICE, name, "1.0.0"))
    result = npm(tmp_path, registry, ALICE, "owner", "add", "nobody-at-all", name)
    assert result.returncode != 0 and "E404" in output(result)


def test_a_scope_belongs_to_its_first_publisher(tmp_path: Path, registry: str) -> None:
    scope = f"@alice{uuid.uuid4().hex[:6]}"
    ok(publish(tmp_path, registry, ALICE, f"{scope}/first", "1.0.0"))
    refused(publish(tmp_path, registry, BOB, f"{scope}/anything", "1.0.0"), f"scope {scope} belongs to alice")
    ok(publish(tmp_path, registry, ALICE, f"{scope}/second", "1.0.0"))
    # Added to one package of the scope, bob may publish that package, still no new names in it.
    ok(npm(tmp_path, registry, ALICE, "owner", "add", "bob", f"{scope}/first"))
    ok(publish(tmp_path, registry, BOB, f"{scope}/first", "1.1.0"))
    refused(publish(tmp_path, registry, BOB, f"{scope}/third", "1.0.0"), f"scope {scope} belongs to alice")
    # bob's own scope is his.
    ok(publish(tmp_path, registry, BOB, f"@bob{scope[6:]}/tool", "1.0.0"))
