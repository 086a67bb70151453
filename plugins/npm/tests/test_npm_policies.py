"""Supply-chain policies on an npm registry, in process: the release-age gate, block and allow
lists, exemptions and explained refusals, against a local upstream whose versions carry chosen
publish times. Each test names the mistake it guards against (issue 15's edge cases)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from batlehub_npm import upstream as npm_upstream
from batlehub_npm.documents import without_versions
from npm_testdata import ADMIN, ALICE, auth, hub_settings, publish_body
from policy_upstream import DAY, HOUR, PolicyUpstream, running_upstream

from batlehub.app import create_app

ABBREVIATED = {"Accept": "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"}
Hub = Callable[..., Any]


@pytest.fixture
async def upstream() -> AsyncIterator[PolicyUpstream]:
    async with running_upstream() as registry:
        yield registry


@pytest.fixture
def make_hub(aiohttp_client: Any, tmp_path: Path, upstream: PolicyUpstream) -> Hub:
    """A hub with a proxy registry `npm` of the upstream and a local registry `own`."""
    counter = iter(range(100))

    async def make(policy: dict[str, Any] | None = None, local_policy: dict[str, Any] | None = None) -> TestClient:
        proxy: dict[str, Any] = {"type": "npm", "name": "npm", "mode": "proxy", "upstreams": [upstream.url]}
        own: dict[str, Any] = {"type": "npm", "name": "own", "mode": "local"}
        if policy is not None:
            proxy["policy"] = policy
        if local_policy is not None:
            own["policy"] = local_policy
        settings = hub_settings(tmp_path / f"data{next(counter)}", registries=[proxy, own])
        client: TestClient = await aiohttp_client(create_app(settings))
        return client

    return make


async def packument(client: TestClient, name: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = await client.get(f"/registries/npm/{name}", headers=headers or {})
    assert response.status == 200, await response.text()
    data: dict[str, Any] = await response.json(content_type=None)
    return data


async def add_rule(client: TestClient, kind: str, **body: Any) -> dict[str, Any]:
    response = await client.post(f"/api/v1/admin/policies/{kind}", json=body, headers=auth(ADMIN))
    assert response.status == 201, await response.text()
    data: dict[str, Any] = await response.json()
    return data


def young_and_old(upstream: PolicyUpstream, name: str = "gated") -> None:
    now = time.time()
    upstream.add(
        name,
        {"1.0.0": now - 30 * DAY, "1.1.0": now - 5 * DAY, "1.2.0": now - HOUR},
        tags={"latest": "1.2.0", "next": "1.2.0", "stable": "1.1.0"},
    )


# --- the release-age gate -------------------------------------------------------------------------


async def test_a_young_version_is_hidden_and_latest_points_at_the_previous_one(
    make_hub: Hub, upstream: PolicyUpstream
) -> None:
    young_and_old(upstream)
    client = await make_hub({"min_release_age": "3d"})
    for headers in ({}, ABBREVIATED):
        doc = await packument(client, "gated", headers)
        assert set(doc["versions"]) == {"1.0.0", "1.1.0"}
        # `latest` repaired to the newest visible version; a tag on the hidden one is dropped,
        # one on a visible version is kept.
        assert doc["dist-tags"] == {"latest": "1.1.0", "stable": "1.1.0"}
        # `time` stays, so client-side gates (pnpm, npm --before) keep working.
        assert set(doc["time"]) >= {"1.0.0", "1.1.0", "created", "modified"}
        assert "1.2.0" not in doc["time"]
    # The abbreviated form has no times upstream: the hub asked for the full packument instead.
    assert all("install-v1" not in accept for _, path, accept in upstream.requests if "/-/" not in path)


async def test_age_is_the_upstream_publish_time_not_when_the_hub_first_saw_it(
    make_hub: Hub, upstream: PolicyUpstream
) -> None:
    """A mirror that starts today must not hold back a version published five days ago: gating on
    first-seen time would hide 1.1.0 (and every other version) here."""
    young_and_old(upstream)
    client = await make_hub({"min_release_age": "3d"})
    assert "1.1.0" in (await packument(client, "gated"))["versions"]
    why = await client.get("/api/v1/admin/why/npm/gated/1.2.0", headers=auth(ADMIN))
    body = await why.json()
    assert body["decision"] == "hidden" and body["rule"] == "release-age"
    assert body["published"].startswith(time.strftime("%Y-%m-%d", time.gmtime(time.time() - HOUR)))


async def test_a_hidden_version_is_not_served_when_asked_for_directly(make_hub: Hub, upstream: PolicyUpstream) -> None:
    young_and_old(upstream)
    client = await make_hub({"min_release_age": "3d"})
    for path in ("/registries/npm/gated/-/gated-1.2.0.tgz", "/registries/npm/gated/1.2.0"):
        response = await client.get(path)
        assert response.status == 403, path
        assert response.headers["X-BatleHub-Policy"] == "hidden; rule=release-age"
        body = await response.json()
        assert body["policy"]["rule"] == "release-age" and body["policy"]["decision"] == "hidden"
        assert "min_release_age is 3d" in body["error"] and "gated@1.2.0" in body["error"]
    assert upstream.tarball_requests("gated", "1.2.0") == 0  # never even fetched
    ok = await client.get("/registries/npm/gated/-/gated-1.1.0.tgz")
    assert ok.status == 200
    # A refusal for a held-back version is no attack: it must not feed automatic IP bans.
    assert (await client.get("/api/v1/admin/ip-blocks", headers=auth(ADMIN))).status == 200


async def test_a_version_without_a_publish_time_is_hidden_unless_configured(
    make_hub: Hub, upstream: PolicyUpstream
) -> None:
    now = time.time()
    upstream.add("untimed", {"1.0.0": now - 10 * DAY, "2.0.0": None})
    strict = await make_hub({"min_release_age": "3d"})
    doc = await packument(strict, "untimed")
    assert set(doc["versions"]) == {"1.0.0"} and doc["dist-tags"]["latest"] == "1.0.0"
    refused = await strict.get("/registries/npm/untimed/-/untimed-2.0.0.tgz")
    assert refused.status == 403 and "no publish time" in (await refused.json())["error"]

    lenient = await make_hub({"min_release_age": "3d", "missing_time": "allow"})
    assert set((await packument(lenient, "untimed"))["versions"]) == {"1.0.0", "2.0.0"}


async def test_per_scope_age_overrides_the_registry_age(make_hub: Hub, upstream: PolicyUpstream) -> None:
    now = time.time()
    upstream.add("@corp/tool", {"1.0.0": now - 10 * DAY, "1.1.0": now - HOUR})
    upstream.add("plain", {"1.0.0": now - 10 * DAY, "1.1.0": now - 2 * DAY})
    client = await make_hub(
        {
            "min_release_age": "1d",
            "age": [{"package": "@corp", "min_release_age": "0"}, {"package": "pl*", "min_release_age": "3d"}],
        }
    )
    assert set((await packument(client, "@corp/tool"))["versions"]) == {"1.0.0", "1.1.0"}
    assert set((await packument(client, "plain"))["versions"]) == {"1.0.0"}


async def test_a_version_becomes_visible_once_old_enough(make_hub: Hub, upstream: PolicyUpstream) -> None:
    """The cached decision ends when the version comes of age, not at the next policy change."""
    now = time.time()
    upstream.add("ripening", {"1.0.0": now - 10 * DAY, "1.1.0": now - 3 * DAY + 1.5})
    client = await make_hub({"min_release_age": "3d"})
    assert set((await packument(client, "ripening"))["versions"]) == {"1.0.0"}
    await asyncio.sleep(2.0)
    doc = await packument(client, "ripening")
    assert set(doc["versions"]) == {"1.0.0", "1.1.0"} and doc["dist-tags"]["latest"] == "1.1.0"


async def test_local_packages_are_not_gated_unless_asked(make_hub: Hub) -> None:
    for gate_local, visible in ((False, {"1.0.0"}), (True, set())):
        client = await make_hub(local_policy={"min_release_age": "3d", "gate_local": gate_local})
        published = await client.put("/registries/own/mine", json=publish_body("mine", "1.0.0"), headers=auth(ALICE))
        assert published.status == 201
        response = await client.get("/registries/own/mine")
        assert set((await response.json())["versions"]) == visible
        tarball = await client.get("/registries/own/mine/-/mine-1.0.0.tgz")
        assert tarball.status == (200 if visible else 403)


# --- exemptions, block and allow lists ------------------------------------------------------------


async def test_an_exemption_lets_a_held_back_version_through_until_removed(
    make_hub: Hub, upstream: PolicyUpstream
) -> None:
    young_and_old(upstream)
    client = await make_hub({"min_release_age": "3d"})
    assert "1.2.0" not in (await packument(client, "gated"))["versions"]
    rule = await add_rule(
        client,
        "exemptions",
        registry="npm",
        package="gated",
        versions="1.2.0",
        reason="needed for a fix",
        expires_in_days=1,
    )
    assert rule["author"] == "admin" and rule["rule"].startswith("exempt/") and rule["expires"]
    doc = await packument(client, "gated")
    assert "1.2.0" in doc["versions"] and doc["dist-tags"]["latest"] == "1.2.0"
    assert (await client.get("/registries/npm/gated/-/gated-1.2.0.tgz")).status == 200
    why = await (await client.get("/api/v1/admin/why/npm/gated/1.2.0", headers=auth(ADMIN))).json()
    assert why["decision"] == "visible" and why["rule"] == rule["rule"]
    assert {o["action"] for o in why["opinions"]} == {"hide", "exempt"}

    removed = await client.delete(f"/api/v1/admin/policies/exemptions/{rule['id']}", headers=auth(ADMIN))
    assert removed.status == 200
    assert "1.2.0" not in (await packument(client, "gated"))["versions"]


async def test_a_blocked_range_is_refused_in_metadata_and_downloads(make_hub: Hub, upstream: PolicyUpstream) -> None:
    now = time.time()
    upstream.add("evil", {"1.0.0": now - 90 * DAY, "1.0.1": now - 60 * DAY, "1.1.0-beta.1": now - 30 * DAY})
    client = await make_hub()
    assert len((await packument(client, "evil"))["versions"]) == 3
    rule = await add_rule(client, "blocks", registry="npm", package="evil", versions=">=1.0.1", reason="compromised")
    doc = await packument(client, "evil")
    # The prerelease inside the range is blocked too.
    assert set(doc["versions"]) == {"1.0.0"} and doc["dist-tags"]["latest"] == "1.0.0"
    refused = await client.get("/registries/npm/evil/-/evil-1.0.1.tgz")
    assert refused.status == 403
    assert refused.headers["X-BatleHub-Policy"] == f"blocked; rule={rule['rule']}"
    assert "compromised" in (await refused.json())["error"]
    # An allow rule does not lift a block; an exemption does.
    await add_rule(client, "allows", registry="npm", package="evil", reason="we trust it")
    assert (await client.get("/registries/npm/evil/-/evil-1.0.1.tgz")).status == 403


async def test_blocks_reach_local_packages_and_whole_scopes(make_hub: Hub) -> None:
    client = await make_hub()
    for version in ("1.0.0", "1.1.0"):
        body = publish_body("@acme/lib", version)
        assert (await client.put("/registries/own/@acme%2flib", json=body, headers=auth(ALICE))).status == 201
    await add_rule(client, "blocks", registry="own", package="@acme", reason="vendor withdrawn")
    response = await client.get("/registries/own/@acme%2flib")
    assert (await response.json())["versions"] == {}
    assert (await client.get("/registries/own/@acme/lib/-/lib-1.0.0.tgz")).status == 403
    # What the CLI reads before editing still has every version (an unpublish must not lose any).
    edit = await client.get("/registries/own/@acme%2flib?write=true", headers=auth(ALICE))
    assert set((await edit.json())["versions"]) == {"1.0.0", "1.1.0"}


async def test_an_allow_rule_lifts_the_age_gate_for_a_trusted_package(make_hub: Hub, upstream: PolicyUpstream) -> None:
    young_and_old(upstream)
    client = await make_hub({"min_release_age": "3d"})
    await add_rule(client, "allows", registry="npm", package="gated", reason="our own package, proxied")
    assert "1.2.0" in (await packument(client, "gated"))["versions"]


# --- the cost of filtering ------------------------------------------------------------------------


async def test_the_filtered_document_is_made_once_not_per_request(
    make_hub: Hub, upstream: PolicyUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter that copies the document per request turns every install into a denial of service:
    forty requests in two forms cost one run of the format's filter."""
    young_and_old(upstream)
    runs: list[tuple[str, ...]] = []

    def counting(body: bytes, withheld: tuple[str, ...]) -> bytes:
        runs.append(withheld)
        return without_versions(body, withheld)

    monkeypatch.setattr(npm_upstream, "PACKUMENT", replace(npm_upstream.PACKUMENT, without=counting))
    client = await make_hub({"min_release_age": "3d"})
    for _ in range(20):
        for headers in ({}, ABBREVIATED):
            assert "1.2.0" not in (await packument(client, "gated", headers))["versions"]
    assert runs == [("1.2.0",)]


# --- audit, counters, the admin API ---------------------------------------------------------------


async def test_decisions_are_counted_and_audited_without_flooding(make_hub: Hub, upstream: PolicyUpstream) -> None:
    young_and_old(upstream)
    client = await make_hub({"min_release_age": "3d"})
    for _ in range(5):
        await packument(client, "gated")
        assert (await client.get("/registries/npm/gated/-/gated-1.2.0.tgz")).status == 403
    await asyncio.sleep(0.1)  # audit entries are written after answering
    log = await (await client.get("/api/v1/admin/audit-log?registry=npm", headers=auth(ADMIN))).json()
    actions = [e["action"] for e in log["entries"]]
    assert actions.count("policy.withheld") == 1 and actions.count("policy.refused") == 1
    overview = await (await client.get("/api/v1/admin/policies", headers=auth(ADMIN))).json()
    assert overview["registries"]["npm"]["min_release_age"] == "3d"
    refused = {(c["decision"], c["rule"]): c["count"] for c in overview["counters"]["refused_requests"]}
    assert refused[("hidden", "release-age")] == 5
    assert overview["counters"]["filtered_documents"]["npm"] >= 5


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        ("blocks", None, "request body is not valid JSON"),
        ("blocks", [], "request body must be a JSON object"),
        ("blocks", {"package": "x", "reason": "r"}, "registry: expected the name of a registry"),
        ("blocks", {"registry": "nope", "package": "x", "reason": "r"}, "registry: expected the name"),
        ("blocks", {"registry": "npm", "reason": "r"}, "package: expected a package name"),
        ("blocks", {"registry": "npm", "package": "a b", "reason": "r"}, "package: expected at most"),
        ("blocks", {"registry": "npm", "package": "../x", "reason": "r"}, "package:"),
        ("blocks", {"registry": "npm", "package": "x", "versions": ">>1", "reason": "r"}, "versions: not a semver"),
        ("blocks", {"registry": "npm", "package": "x", "versions": 3, "reason": "r"}, "versions: expected"),
        ("blocks", {"registry": "npm", "package": "x"}, "reason: expected"),
        ("blocks", {"registry": "npm", "package": "x", "reason": "r", "expires": "soon"}, "expires: expected an ISO"),
        ("blocks", {"registry": "npm", "package": "x", "reason": "r", "expires": "2001-01-01"}, "in the past"),
        ("blocks", {"registry": "npm", "package": "x", "reason": "r", "expires_in_days": -1}, "expires_in_days"),
        ("blocks", {"registry": "npm", "package": "x", "reason": "r", "colour": 1}, "colour: unknown field"),
        ("exemptions", {"registry": "npm", "package": "x", "reason": "r"}, "expires: an exemption needs an expiry"),
    ],
)
async def test_bad_rules_are_refused_with_what_is_wrong(make_hub: Hub, kind: str, body: Any, message: str) -> None:
    client = await make_hub()
    data = b"not json" if body is None else None
    response = await client.post(
        f"/api/v1/admin/policies/{kind}", json=body if data is None else None, data=data, headers=auth(ADMIN)
    )
    assert response.status == 400, await response.text()
    assert message in (await response.json())["error"]


async def test_the_admin_api_lists_and_protects_rules(make_hub: Hub, upstream: PolicyUpstream) -> None:
    client = await make_hub({"block": [{"package": "old-bad", "reason": "in the config"}]})
    assert (await client.get("/api/v1/admin/policies")).status == 401
    assert (await client.get("/api/v1/admin/policies", headers=auth(ALICE))).status == 403
    assert (await client.get("/api/v1/admin/policies/colours", headers=auth(ADMIN))).status == 404
    rules = (await (await client.get("/api/v1/admin/policies/blocks", headers=auth(ADMIN))).json())["rules"]
    assert [(r["package"], r["source"]) for r in rules] == [("old-bad", "config")]
    config_rule = rules[0]["id"]
    assert (await client.delete(f"/api/v1/admin/policies/blocks/{config_rule}", headers=auth(ADMIN))).status == 409
    assert (await client.delete("/api/v1/admin/policies/blocks/nope", headers=auth(ADMIN))).status == 404
    assert (await client.get("/api/v1/admin/why/npm/never-heard-of/1.0.0", headers=auth(ADMIN))).status == 404
    young_and_old(upstream)
    assert (await client.get("/api/v1/admin/why/npm/gated/9.9.9", headers=auth(ADMIN))).status == 404
