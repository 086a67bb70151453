"""Core of policies, format-independent: durations and patterns as written in rules, how verdicts
combine, and a third-party policy plugin on the `register_policies` hook (async, and failing).
npm's behaviour end to end is in plugins/npm/tests/test_npm_policies*.py."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pluggy
import pytest

from batlehub.app import create_app
from batlehub.config import ConfigError, parse_settings
from batlehub.interfaces import ALLOW, BLOCK, EXEMPT, HIDE, PolicySetup, PolicySubject, PolicyType, Verdict
from batlehub.plugins import get_plugin_manager, hookimpl
from batlehub.policies import combine
from batlehub.policy_config import format_duration, name_matcher, parse_duration, semver_range, version_matcher

ADMIN = "admin-token-0123456789"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3d", 259200), ("12h", 43200), ("1d12h", 129600), ("90m", 5400), ("0", 0), (45, 45), ("1w", 604800)],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["3x", "d3", "-1d", "3d garbage", True, None, "1e400d"])
def test_bad_durations_are_refused(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_patterns_match_names_scopes_and_globs() -> None:
    def scope(name: str) -> str | None:
        return name.split("/")[0] if name.startswith("@") and "/" in name else None

    assert name_matcher("left-pad", scope)("left-pad") and not name_matcher("left-pad", scope)("left-pads")
    assert name_matcher("@evil", scope)("@evil/anything") and not name_matcher("@evil", scope)("@evilcorp/x")
    assert name_matcher("@corp/*", scope)("@corp/x") and not name_matcher("@corp/*", scope)("@corpx/y")
    assert name_matcher("*-cli", scope)("foo-cli") and not name_matcher("*-cli", scope)("foo-client")
    assert name_matcher("a.b?", None)("a.bc") and not name_matcher("a.b?", None)("axbc")  # '.' is literal


def test_semver_ranges_include_prereleases_and_star_matches_everything() -> None:
    rule = semver_range(">=1.2.0 <2")
    assert rule("1.2.0") and rule("1.9.9") and rule("1.5.0-beta.1") and not rule("2.0.0") and not rule("1.1.9")
    assert not rule("not-a-version")
    assert version_matcher("*", semver_range)("anything at all")
    assert version_matcher("1.0.0 || 2.0.0", None)("2.0.0") and not version_matcher("1.0.0", None)("1.0.1")
    with pytest.raises(ValueError):
        semver_range(">>1")


def test_the_strongest_verdict_wins_whatever_the_order() -> None:
    hide, block = Verdict(HIDE, "age", "young", until=100.0), Verdict(BLOCK, "block/1", "bad")
    allow, exempt = Verdict(ALLOW, "allow/1", "trusted"), Verdict(EXEMPT, "exempt/1", "needed", until=50.0)
    versions = {"1": None, "2": None, "3": None, "4": None}
    for opinions in (
        [("a", {"1": hide, "2": hide, "3": hide, "4": block}), ("b", {"2": allow, "3": exempt, "4": allow})],
        [("b", {"2": allow, "3": exempt, "4": allow}), ("a", {"1": hide, "2": hide, "3": hide, "4": block})],
    ):
        withheld, until = combine(opinions, versions)
        assert {v: d.state for v, d in withheld.items()} == {"1": "hidden", "4": "blocked"}
        assert withheld["4"].rule == "block/1" and until == 50.0


# --- a third-party policy ------------------------------------------------------------------------


class NoOddPatches:
    """Hides every version whose patch number is odd (async, to prove core awaits it)."""

    name = "no-odd-patches"
    needs_times = False

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.calls = 0

    def concerns(self, package: str, local: bool) -> bool:
        return package.startswith("odd")

    async def decide(self, subject: PolicySubject) -> Mapping[str, Verdict]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("feed unavailable")
        return {v: Verdict(HIDE, "no-odd-patches", "odd patch") for v in subject.versions if int(v[-1]) % 2}


class OddPlugin:
    def __init__(self, fail: bool = False) -> None:
        self.policies: list[NoOddPatches] = []
        self.fail = fail

    @hookimpl
    def register_policies(self) -> list[PolicyType]:
        def build(setup: PolicySetup) -> NoOddPatches:
            policy = NoOddPatches(self.fail)
            self.policies.append(policy)
            return policy

        return [PolicyType(name="no-odd-patches", description="test", factory=build)]


@pytest.fixture
def odd_pm() -> Iterator[tuple[pluggy.PluginManager, OddPlugin]]:
    pm = get_plugin_manager()
    plugin = OddPlugin()
    pm.register(plugin, name="test-odd")
    yield pm, plugin
    pm.unregister(name="test-odd")


def settings(tmp_path: Path) -> Any:
    return parse_settings(
        {
            "auth": [{"type": "token", "tokens": [{"value": ADMIN, "role": "admin", "user_id": "admin"}]}],
            "registries": [{"type": "npm", "name": "npm", "mode": "local"}],
        },
        data_dir=tmp_path,
    )


async def publish(client: Any, name: str, version: str) -> None:
    from npm_testdata import publish_body  # the npm plugin's test data: a body as `npm publish` sends it

    response = await client.put(
        f"/registries/npm/{name}", json=publish_body(name, version), headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert response.status == 201, await response.text()


@pytest.fixture(autouse=True)
def npm_testdata_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "plugins" / "npm" / "tests"))


async def test_a_plugin_policy_applies_to_metadata_and_downloads(
    odd_pm: tuple[pluggy.PluginManager, OddPlugin], aiohttp_client: Any, tmp_path: Path
) -> None:
    pm, plugin = odd_pm
    client = await aiohttp_client(create_app(settings(tmp_path), pm))
    for version in ("1.0.0", "1.0.1", "1.0.2"):
        await publish(client, "odd-one", version)
    for _ in range(3):
        doc = await (await client.get("/registries/npm/odd-one")).json()
        assert set(doc["versions"]) == {"1.0.0", "1.0.2"} and doc["dist-tags"]["latest"] == "1.0.2"
    refused = await client.get("/registries/npm/odd-one/-/odd-one-1.0.1.tgz")
    assert refused.status == 403 and refused.headers["X-BatleHub-Policy"] == "hidden; rule=no-odd-patches"
    assert plugin.policies[0].calls == 1  # once per revision of the package, not per request
    await publish(client, "even-one", "1.0.1")
    assert "1.0.1" in (await (await client.get("/registries/npm/even-one")).json())["versions"]
    assert plugin.policies[0].calls == 1  # concerns() said no: the package's versions were not even read
    why = await client.get("/api/v1/admin/why/npm/odd-one/1.0.1", headers={"Authorization": f"Bearer {ADMIN}"})
    assert (await why.json())["policies"] == ["no-odd-patches", "lists"]


async def test_a_failing_policy_fails_closed_for_its_packages_only(aiohttp_client: Any, tmp_path: Path) -> None:
    pm = get_plugin_manager()
    pm.register(OddPlugin(fail=True), name="test-odd-failing")
    try:
        client = await aiohttp_client(create_app(settings(tmp_path), pm))
        await publish(client, "even-one", "1.0.0")
        assert (await client.get("/registries/npm/even-one")).status == 200
        await publish(client, "odd-one", "1.0.0")
        response = await client.get("/registries/npm/odd-one")
        assert response.status == 503 and "no-odd-patches" in (await response.json())["error"]
    finally:
        pm.unregister(name="test-odd-failing")


def test_config_rules_are_checked_with_the_format(tmp_path: Path) -> None:
    raw = {
        "registries": [
            {
                "type": "npm",
                "name": "npm",
                "mode": "local",
                "policy": {"block": [{"package": "x", "versions": ">>1", "reason": "r"}], "min_release_age": "2d"},
            }
        ]
    }
    with pytest.raises(ConfigError) as info:
        create_app(parse_settings(raw, data_dir=tmp_path))
    assert info.value.problems == ["registries[0].policy.block[0].versions: not a semver range: '>>1'"]


async def test_rules_keep_applying_while_the_database_is_down(tmp_path: Path) -> None:
    """Proxied documents are served from the cache while PostgreSQL is down: a rules check that
    needs the database must not turn each of those requests into an error."""
    from batlehub import policy_rules
    from batlehub.builtin.cache_memory import MemoryCache
    from batlehub.coordination import FailOpenCache
    from batlehub.db import create_database

    db = create_database(settings(tmp_path))
    await db.connect()
    await db.migrate()
    book = policy_rules.RuleBook(db=db, cache=FailOpenCache(MemoryCache()), formats={})
    assert await book.revision() == 0
    await db.close()  # every query fails from here on
    await book.cache.invalidate(policy_rules.REVISION_KEY)
    book._checked = float("-inf")
    assert await book.revision() == 0
