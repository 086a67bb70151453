"""Supply-chain policies on a PyPI registry (issue 15): the release-age gate by the upstream's
`upload-time`, block rules with PEP 440 ranges, exemptions, and refusals of a withheld release's
files, `.metadata` files and JSON document; in process against a local index whose files carry
chosen upload times, and end to end with the real pip and uv against `batlehub serve`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from batlehub_pypi import pages as pypi_pages
from batlehub_pypi import upstream as pypi_upstream
from batlehub_pypi.names import file_version, pep440_range
from batlehub_pypi.pages import render_proxied_json
from batlehub_pypi.simple import parse_project_page
from batlehub_pypi.upstream import published_times, without_versions
from batlehub_pypi_testing.clients import client_env, output, pip_install, uv_pip_install
from batlehub_pypi_testing.packages import module_name
from pypi_policy_upstream import DAY, HOUR, JSON_V1, PolicyIndex, running_index
from pypi_testdata import basic, upload_form, wheel_bytes
from yarl import URL

from batlehub import appkeys
from batlehub.app import create_app
from batlehub.config import parse_settings
from batlehub.errors import ConfigError
from batlehub.testing.hub import HubFactory, token_auth_toml

ADMIN = "policy-admin-token-0123456789"
ALICE = "policy-alice-token-0123456789"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
HTML = {"Accept": "text/html"}
JSON = {"Accept": JSON_V1}
Hub = Callable[..., Any]


@pytest.fixture
async def index() -> AsyncIterator[PolicyIndex]:
    async with running_index() as running:
        yield running


@pytest.fixture
def make_hub(aiohttp_client: Any, tmp_path: Path, index: PolicyIndex) -> Hub:
    """A hub with a proxy registry `mirror` of the index and a local registry `own`."""
    counter = iter(range(100))

    async def make(
        policy: dict[str, Any] | None = None,
        local_policy: dict[str, Any] | None = None,
        mirror_options: dict[str, Any] | None = None,
    ) -> TestClient:
        every = ["releases:read", "source:read", "releases:publish", "releases:delete"]
        mirror: dict[str, Any] = {"type": "pypi", "name": "mirror", "mode": "proxy", "upstreams": [index.url]}
        mirror.update(mirror_options or {})
        own: dict[str, Any] = {"type": "pypi", "name": "own", "mode": "local", "rbac": {"user": every}}
        if policy is not None:
            mirror["policy"] = policy
        if local_policy is not None:
            own["policy"] = local_policy
        tokens = [
            {"value": ADMIN, "role": "admin", "user_id": "admin"},
            {"value": ALICE, "role": "user", "user_id": "alice"},
        ]
        raw = {"auth": [{"type": "token", "tokens": tokens}], "registries": [mirror, own]}
        settings = parse_settings(raw, data_dir=tmp_path / f"data{next(counter)}")
        client: TestClient = await aiohttp_client(create_app(settings))
        return client

    return make


async def page(client: TestClient, project: str, registry: str = "mirror") -> dict[str, Any]:
    response = await client.get(f"/registries/{registry}/simple/{project}/", headers=JSON)
    assert response.status == 200, await response.text()
    data: dict[str, Any] = await response.json(content_type=None)
    return data


def versions_of(data: dict[str, Any]) -> set[str]:
    return {str(file_version(f["filename"])) for f in data["files"]}


async def add_rule(client: TestClient, kind: str, **body: Any) -> dict[str, Any]:
    response = await client.post(f"/api/v1/admin/policies/{kind}", json=body, headers=ADMIN_HEADERS)
    assert response.status == 201, await response.text()
    data: dict[str, Any] = await response.json()
    return data


def young_and_old(index: PolicyIndex, project: str = "gated") -> None:
    now = time.time()
    index.add(project, {"1.0": now - 30 * DAY, "1.1": now - 5 * DAY, "1.2": now - HOUR, "2.0": None})


def wheel(project: str, version: str) -> str:
    return f"{module_name(project)}-{version}-py3-none-any.whl"


# --- what the extractor and the filter read of odd pages ------------------------------------------


def test_publish_times_come_from_the_earliest_upload_time_of_each_release() -> None:
    page = {
        "meta": {"api-version": "1.1"},
        "name": "odd",
        "versions": ["1.0", "1.1-RC1", "3.0", "not a version"],
        "files": [
            {"filename": "odd-1.0.tar.gz", "url": "a", "hashes": {}, "upload-time": "2024-01-02T00:00:00Z"},
            {"filename": "odd-1.0-py3-none-any.whl", "url": "b", "hashes": {}, "upload-time": "2024-01-01T00:00:00Z"},
            # A wheel added to an old release later does not make the release young.
            {"filename": "odd-1.0-cp312-none-any.whl", "url": "c", "hashes": {}, "upload-time": "2026-01-01T00:00:00"},
            {"filename": "Odd-1.1rc1.tar.gz", "url": "d", "hashes": {}, "upload-time": "yesterday"},
            {"filename": "odd-2.0-py2.7.egg", "url": "e", "hashes": {}, "upload-time": "2024-03-01T12:00:00+02:00"},
            {"filename": "odd-setup.exe", "url": "f", "hashes": {}, "upload-time": "2024-03-01T00:00:00Z"},
            {"filename": "odd-x.y.whl", "url": "g", "hashes": {}},
        ],
    }
    times = published_times(json.dumps(page).encode())
    assert times == {
        "1.0": 1704067200.0,
        "1.1rc1": None,  # an unreadable time is no time
        "2.0": 1709287200.0,  # an egg's version read from its name; the zone honoured
        "3.0": None,  # listed, but no file tells a time
        "not a version": None,
    }


def test_the_filter_drops_only_the_withheld_releases_files_in_either_form() -> None:
    files = [
        ("odd-1.0-py3-none-any.whl", "sha256", "aa"),
        ("odd-2.0.tar.bz2", "md5", "bb"),  # an older sdist form still names its version
        ("odd-2.0-1-py3-none-any.whl", "sha256", "cc"),  # a build tag: still release 2.0
        ("odd-installer.exe", "sha256", "dd"),  # names no version: kept, installers skip it
    ]
    doc = {
        "meta": {"api-version": "1.1", "_last-serial": 7},
        "name": "odd",
        "versions": ["1.0", "2.0.0"],
        "files": [
            {"filename": n, "url": f"../{n}", "hashes": {a: d}, "upload-time": "2024-01-01T00:00:00Z"}
            for n, a, d in files
        ],
    }
    body = json.dumps(doc).encode()
    assert published_times(body) == {"1.0": 1704067200.0, "2.0": 1704067200.0, "2.0.0": 1704067200.0}
    filtered = json.loads(without_versions(body, ("2.0", "2.0.0")))
    assert [f["filename"] for f in filtered["files"]] == ["odd-1.0-py3-none-any.whl", "odd-installer.exe"]
    assert filtered["versions"] == ["1.0"] and filtered["meta"] == doc["meta"]
    assert filtered["files"][0]["upload-time"] == "2024-01-01T00:00:00Z"

    html = "".join(
        f'<a href="../{n}#{a}={d}" data-requires-python="&gt;=3.8">{n}</a><br/>\n' for n, a, d in files
    ).encode()
    left = parse_project_page(without_versions(b"<!DOCTYPE html><html><body>" + html, ("2.0",)))
    assert left["files"] == [
        {"filename": n, "url": f"../{n}", "hashes": {a: d}, "requires-python": ">=3.8"}
        for n, a, d in (files[0], files[3])
    ]
    # A lone surrogate from the upstream survives the round trip as an escape.
    odd = b'{"name":"odd","files":[{"filename":"odd-2.0.tar.gz","url":"x","hashes":{}}],"x":"\\ud800"}'
    assert json.loads(without_versions(odd, ("2.0",)))["files"] == []


def test_pep_440_ranges_include_prereleases_and_refuse_nonsense() -> None:
    block = pep440_range(">=2,<3")
    assert [block(v) for v in ("1.9", "2.0", "2.1b1", "2.9.post1", "3.0", "junk")] == [
        False,
        True,
        True,
        True,
        False,
        False,
    ]
    one = pep440_range("1.0 || ~=2.2.0")
    assert [one(v) for v in ("1.0", "1.0.0", "1.0.1", "2.2.5", "2.3")] == [True, True, False, True, False]
    for bad in (">>1", "1.0 ||", "one"):
        with pytest.raises(ValueError, match="PEP 440"):
            pep440_range(bad)


# --- the release-age gate, in process -------------------------------------------------------------


async def test_a_young_or_untimed_release_is_hidden_from_pages_and_the_json_api(
    make_hub: Hub, index: PolicyIndex
) -> None:
    young_and_old(index)
    client = await make_hub({"min_release_age": "3d"})
    data = await page(client, "gated")
    assert versions_of(data) == {"1.0", "1.1"} and data["versions"] == ["1.0", "1.1"]
    # `upload-time` stays, so client-side gates (uv's --exclude-newer) keep working.
    assert all(f["upload-time"].endswith("Z") for f in data["files"])
    html = await (await client.get("/registries/mirror/simple/gated/", headers=HTML)).text()
    assert "gated-1.1-py3-none-any.whl" in html and "gated-1.2" not in html and "gated-2.0" not in html
    api = await (await client.get("/registries/mirror/pypi/gated/json")).json()
    assert set(api["releases"]) == {"1.0", "1.1"} and api["info"]["version"] == "1.1"
    # The age is the upstream's upload time, not when the hub first saw the release.
    why = await (await client.get("/api/v1/admin/why/mirror/gated/1.1", headers=ADMIN_HEADERS)).json()
    assert why["decision"] == "visible" and why["source"] == "upstream"
    why = await (await client.get("/api/v1/admin/why/mirror/gated/2.0", headers=ADMIN_HEADERS)).json()
    assert why["decision"] == "hidden" and why["published"] is None


async def test_a_hidden_release_is_refused_when_asked_for_directly(make_hub: Hub, index: PolicyIndex) -> None:
    young_and_old(index)
    client = await make_hub({"min_release_age": "3d"})
    for path in (
        f"/registries/mirror/files/gated/{wheel('gated', '1.2')}",
        f"/registries/mirror/files/gated/{wheel('gated', '1.2')}.metadata",
        "/registries/mirror/pypi/gated/1.2/json",
        "/registries/mirror/files/gated/gated-1.2.tar.gz",  # a file the index does not even have
    ):
        response = await client.get(path)
        assert response.status == 403, path
        assert response.headers["X-BatleHub-Policy"] == "hidden; rule=release-age"
        body = await response.json()
        assert body["policy"]["decision"] == "hidden" and body["policy"]["version"] == "1.2"
        assert "min_release_age is 3d" in body["error"] and "gated@1.2" in body["error"]
    refused = await client.get(f"/registries/mirror/files/gated/{wheel('gated', '2.0')}")
    assert refused.status == 403 and "no publish time" in (await refused.json())["error"]
    assert index.file_requests("gated-1.2") == 0  # never fetched
    ok = await client.get(f"/registries/mirror/files/gated/{wheel('gated', '1.1')}")
    assert ok.status == 200 and await ok.read() == index.wheel("gated", "1.1")[1]
    assert (await client.get("/registries/mirror/pypi/gated/1.1/json")).status == 200


async def test_an_exemption_lets_a_held_back_release_through_until_removed(make_hub: Hub, index: PolicyIndex) -> None:
    young_and_old(index)
    client = await make_hub({"min_release_age": "3d"})
    assert "1.2" not in versions_of(await page(client, "gated"))
    rule = await add_rule(
        client, "exemptions", registry="mirror", package="gated", versions="==1.2", reason="fix", expires_in_days=1
    )
    assert "1.2" in versions_of(await page(client, "gated"))
    assert (await client.get(f"/registries/mirror/files/gated/{wheel('gated', '1.2')}")).status == 200
    removed = await client.delete(f"/api/v1/admin/policies/exemptions/{rule['id']}", headers=ADMIN_HEADERS)
    assert removed.status == 200
    assert "1.2" not in versions_of(await page(client, "gated"))
    assert (await client.get(f"/registries/mirror/files/gated/{wheel('gated', '1.2')}")).status == 403


async def test_a_blocked_pep_440_range_is_refused_at_once(make_hub: Hub, index: PolicyIndex) -> None:
    now = time.time()
    index.add("evil", {"1.0": now - 90 * DAY, "2.0": now - 60 * DAY, "2.1b1": now - 50 * DAY, "3.0": now - 40 * DAY})
    client = await make_hub()
    assert versions_of(await page(client, "evil")) == {"1.0", "2.0", "2.1b1", "3.0"}
    bad = await client.post(
        "/api/v1/admin/policies/blocks",
        json={"registry": "mirror", "package": "evil", "versions": "^2", "reason": "r"},
        headers=ADMIN_HEADERS,
    )
    assert bad.status == 400 and "versions: not a PEP 440 version range" in (await bad.json())["error"]
    rule = await add_rule(client, "blocks", registry="mirror", package="evil", versions=">=2,<3", reason="hijacked")
    assert versions_of(await page(client, "evil")) == {"1.0", "3.0"}  # the prerelease inside too
    refused = await client.get(f"/registries/mirror/files/evil/{wheel('evil', '2.1b1')}")
    assert refused.status == 403 and refused.headers["X-BatleHub-Policy"] == f"blocked; rule={rule['rule']}"
    assert "hijacked" in (await refused.json())["error"]


async def test_an_html_upstream_tells_no_times_but_its_pages_are_filtered_too(
    make_hub: Hub, index: PolicyIndex
) -> None:
    """PEP 503 HTML has no `upload-time`: "unknown" must not mean "old enough"."""
    index.html_only = True
    young_and_old(index)
    strict = await make_hub({"min_release_age": "3d"})
    assert versions_of(await page(strict, "gated")) == set()
    lenient = await make_hub({"min_release_age": "3d", "missing_time": "allow"})
    assert versions_of(await page(lenient, "gated")) == {"1.0", "1.1", "1.2", "2.0"}
    await add_rule(lenient, "blocks", registry="mirror", package="gated", versions=">=1.2", reason="bad")
    data = await page(lenient, "gated")
    assert versions_of(data) == {"1.0", "1.1"}
    # The page written back keeps the upstream's relative links and digests: its files still come.
    response = await lenient.get(URL(data["files"][0]["url"]).path)
    assert response.status == 200 and await response.read() == index.wheel("gated", "1.0")[1]
    assert data["files"][0]["hashes"] == {"sha256": hashlib.sha256(index.wheel("gated", "1.0")[1]).hexdigest()}


async def test_config_block_rules_take_pep_440_ranges(make_hub: Hub, index: PolicyIndex, tmp_path: Path) -> None:
    now = time.time()
    index.add("evil", {"1.0": now - 90 * DAY, "2.0": now - 60 * DAY, "3.0": now - 40 * DAY})
    client = await make_hub({"block": [{"package": "evil", "versions": "~=2.0", "reason": "in the config"}]})
    assert versions_of(await page(client, "evil")) == {"1.0", "3.0"}
    raw = {"registries": [{"type": "pypi", "name": "p", "mode": "local", "policy": {"block": [
        {"package": "x", "versions": ">=1.2.0 <2", "reason": "an npm range"}]}}]}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        create_app(parse_settings(raw, data_dir=tmp_path / "bad"))
    assert info.value.problems == ["registries[0].policy.block[0].versions: not a PEP 440 version range: '>=1.2.0 <2'"]


async def test_blocks_reach_local_projects_and_local_projects_are_not_gated_unless_asked(make_hub: Hub) -> None:
    async def upload(client: TestClient, version: str) -> None:
        filename, data = wheel_bytes("mine", version)
        form = upload_form("mine", version, filename, data)
        response = await client.post("/registries/own/legacy/", data=form, headers=basic(ALICE))
        assert response.status == 200, await response.text()

    for gate_local, visible in ((False, {"1.0", "2.0"}), (True, set())):
        client = await make_hub(local_policy={"min_release_age": "3d", "gate_local": gate_local})
        await upload(client, "1.0")
        await upload(client, "2.0")
        assert versions_of(await page(client, "mine", "own")) == visible
        download = await client.get(f"/registries/own/files/mine/{wheel('mine', '1.0')}")
        assert download.status == (200 if visible else 403)

    client = await make_hub()
    await upload(client, "1.0")
    await upload(client, "2.0")
    await add_rule(client, "blocks", registry="own", package="mine", versions=">=2", reason="withdrawn")
    assert versions_of(await page(client, "mine", "own")) == {"1.0"}
    api = await (await client.get("/registries/own/pypi/mine/json")).json()
    assert set(api["releases"]) == {"1.0"}
    for path in (
        f"/registries/own/files/mine/{wheel('mine', '2.0')}",
        f"/registries/own/files/mine/{wheel('mine', '2.0')}.metadata",
        "/registries/own/pypi/mine/2.0/json",
    ):
        response = await client.get(path)
        assert response.status == 403, path
        assert "withdrawn" in (await response.json())["error"]
    # The hidden release is still there for its owner to delete.
    deleted = await client.delete("/registries/own/pypi/mine/2.0/", headers=basic(ALICE))
    assert deleted.status == 200


async def test_the_filtered_page_is_made_once_not_per_request(
    make_hub: Hub, index: PolicyIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    young_and_old(index)
    runs: list[tuple[str, ...]] = []

    def counting(body: bytes, withheld: tuple[str, ...]) -> bytes:
        runs.append(withheld)
        return without_versions(body, withheld)

    monkeypatch.setattr(pypi_upstream, "PROJECT_PAGE", replace(pypi_upstream.PROJECT_PAGE, without=counting))
    client = await make_hub({"min_release_age": "3d"})
    for _ in range(10):
        assert "1.2" not in versions_of(await page(client, "gated"))
        assert "gated-1.2" not in await (await client.get("/registries/mirror/simple/gated/", headers=HTML)).text()
        assert "1.2" not in (await (await client.get("/registries/mirror/pypi/gated/json")).json())["releases"]
    assert runs == [("1.2", "2.0")]


async def test_the_json_api_document_is_rendered_once_per_upstream_copy_and_release(
    make_hub: Hub, index: PolicyIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    young_and_old(index)
    runs: list[str | None] = []

    def counting(body: bytes, project: str, url: str, version: str | None) -> tuple[bytes, bytes | None, str] | None:
        runs.append(version)
        return render_proxied_json(body, project, url, version)

    monkeypatch.setattr(pypi_pages, "render_proxied_json", counting)
    ttl = 0.5
    client = await make_hub({"min_release_age": "3d"}, mirror_options={"cache": {"metadata_ttl_secs": ttl}})
    api = "/registries/mirror/pypi/gated/json"
    etags = set()
    for _ in range(10):
        response = await client.get(api, headers={"Accept-Encoding": "gzip"})
        assert response.status == 200 and response.headers["Content-Encoding"] == "gzip"
        assert set((await response.json())["releases"]) == {"1.0", "1.1"}  # 1.2 and 2.0 are held back
        etags.add(response.headers["ETag"])
        release = await client.get("/registries/mirror/pypi/gated/1.1/json")
        assert release.status == 200 and (await release.json())["info"]["version"] == "1.1"
        assert (await client.get("/registries/mirror/pypi/gated/1.2/json")).status == 403
        assert (await client.get("/registries/mirror/pypi/gated/9.9/json")).status == 404
    assert runs == [None, "1.1"]
    (etag,) = etags
    assert (await client.get(api, headers={"If-None-Match": etag})).status == 304

    # The upstream copy changes: a new document, once, with a new ETag.
    index.projects["gated"]["1.0.1"] = time.time() - 20 * DAY
    deadline = time.monotonic() + 10
    while True:
        await asyncio.sleep(ttl)
        response = await client.get(api, headers={"If-None-Match": etag})
        if response.status == 200:
            break
        assert response.status == 304 and time.monotonic() < deadline, "the new upstream copy never showed"
    assert response.headers["ETag"] != etag
    assert set((await response.json())["releases"]) == {"1.0", "1.0.1", "1.1"}
    assert runs == [None, "1.1", None]
    for _ in range(5):
        assert (await client.get(api)).headers["ETag"] == response.headers["ETag"]
    assert runs == [None, "1.1", None]


async def test_big_json_api_documents_are_rendered_in_the_worker_process_alike(
    make_hub: Hub, index: PolicyIndex
) -> None:
    young_and_old(index)
    paths = (
        "/registries/mirror/pypi/gated/json",
        "/registries/mirror/pypi/gated/1.1/json",
        "/registries/own/pypi/mine/json",
        "/registries/own/pypi/mine/1.0/json",
    )
    wheels = {version: wheel_bytes("mine", version) for version in ("1.0", "2.0")}
    answers = []
    for in_worker in (False, True):
        client = await make_hub({"min_release_age": "3d"})
        offload = client.app[appkeys.REGISTRY_SERVICES]["own"].offload
        if in_worker:
            offload.inline_max_bytes = 0  # every document counts as big
        for version, (filename, data) in wheels.items():
            form = upload_form("mine", version, filename, data)
            response = await client.post("/registries/own/legacy/", data=form, headers=basic(ALICE))
            assert response.status == 200, await response.text()
        await add_rule(client, "blocks", registry="own", package="mine", versions=">=2", reason="withdrawn")
        bodies = []
        for path in paths:
            response = await client.get(path, headers={"Accept-Encoding": "gzip"})
            assert response.status == 200, await response.text()
            body = (await response.text()).replace(str(client.make_url("")), "HUB")
            bodies.append(re.sub(r'"(upload_time(_iso_8601)?)":"[^"]*"', r'"\1":""', body))  # when each hub got them
        assert (await client.get("/registries/own/pypi/mine/2.0/json")).status == 403
        assert set(json.loads(bodies[0])["releases"]) == {"1.0", "1.1"}
        assert set(json.loads(bodies[2])["releases"]) == {"1.0"}
        assert (offload._pool is not None) == in_worker
        answers.append(bodies)
    assert answers[0] == answers[1]


# --- end to end: pip and uv against `batlehub serve` ----------------------------------------------


def served_config(index_url: str) -> str:
    return f"""{token_auth_toml({"admin": (ADMIN, "admin")})}
[[registries]]
type = "pypi"
name = "pypi"
mode = "proxy"
upstreams = ["{index_url}"]
[registries.policy]
min_release_age = "3d"
"""


def installed(target: Path, project: str) -> str:
    (found,) = target.glob(f"{module_name(project)}-*.dist-info")
    return found.name.removesuffix(".dist-info").split("-", 1)[1]


@pytest.mark.pypi_cli
async def test_pip_and_uv_install_the_previous_release_until_an_exemption(
    tmp_path: Path, hub: HubFactory, index: PolicyIndex
) -> None:
    young_and_old(index, "fresh-lib")
    now = time.time()
    index.add("timeless", {"1.0": now - 30 * DAY, "2.0": None})
    server = await hub(served_config(index.url))
    simple = f"{server.url}/registries/pypi/simple/"
    env = client_env(tmp_path)

    async def pip(requirements: list[str], label: str) -> tuple[Path, Any]:
        target = tmp_path / label
        return target, await asyncio.to_thread(pip_install, simple, requirements, target, env)

    target, result = await pip(["fresh-lib", "timeless"], "pip-latest")
    assert result.returncode == 0, output(result)
    assert installed(target, "fresh-lib") == "1.1" and installed(target, "timeless") == "1.0"

    target = tmp_path / "uv-latest"
    result = await asyncio.to_thread(uv_pip_install, simple, ["fresh-lib", "timeless"], target, env, "--no-cache")
    assert result.returncode == 0, output(result)
    assert installed(target, "fresh-lib") == "1.1" and installed(target, "timeless") == "1.0"

    _, result = await pip(["fresh-lib==1.2"], "pip-pinned")
    assert result.returncode != 0 and "fresh-lib==1.2" in output(result)

    # The wheel's URL, given to pip directly: refused, and pip shows why.
    url = f"{server.url}/registries/pypi/files/fresh-lib/{wheel('fresh-lib', '1.2')}"
    _, result = await pip([url], "pip-direct")
    assert result.returncode != 0 and "403" in output(result)
    assert "fresh-lib@1.2 is held back" in output(result) and "min_release_age is 3d" in output(result)
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 403
            assert response.headers["X-BatleHub-Policy"] == "hidden; rule=release-age"
            assert "min_release_age is 3d" in (await response.json())["error"]
        exemption = {
            "registry": "pypi",
            "package": "fresh-lib",
            "versions": "==1.2",
            "reason": "security fix we need now",
            "expires_in_days": 2,
        }
        async with session.post(
            f"{server.url}/api/v1/admin/policies/exemptions", json=exemption, headers=ADMIN_HEADERS
        ) as response:
            assert response.status == 201, await response.text()

    target, result = await pip(["fresh-lib==1.2"], "pip-exempted")
    assert result.returncode == 0, output(result)
    assert installed(target, "fresh-lib") == "1.2"


@pytest.mark.pypi_cli
@pytest.mark.slow
async def test_a_blocked_range_holds_on_another_replica_within_a_second(
    tmp_path: Path, hub: HubFactory, index: PolicyIndex, fresh_postgres_url: str, redis_url: str
) -> None:
    now = time.time()
    index.add("shared-lib", {"1.0": now - 90 * DAY, "2.0": now - 30 * DAY, "2.1rc1": now - 20 * DAY})
    shared = f"""
[database]
type = "postgresql"
url = "{fresh_postgres_url}"
[cache]
type = "redis"
url = "{redis_url}"
"""
    config = shared + served_config(index.url).replace('min_release_age = "3d"', "")
    first = await hub(config)
    second = await hub(config)
    wheel_url = f"{second.url}/registries/pypi/files/shared-lib/{wheel('shared-lib', '2.0')}"
    async with aiohttp.ClientSession() as session:
        async with session.get(wheel_url) as response:
            assert response.status == 200  # cached on the second replica before the rule
        block = {"registry": "pypi", "package": "shared-lib", "versions": ">=2,<3", "reason": "hijacked release"}
        async with session.post(f"{first.url}/api/v1/admin/policies/blocks", json=block, headers=ADMIN_HEADERS) as r:
            assert r.status == 201, await r.text()
        answered = time.monotonic()
        while True:
            async with session.get(wheel_url) as response:
                if response.status == 403:
                    assert "hijacked release" in (await response.json())["error"]
                    break
            assert time.monotonic() - answered < 1.0, "the block did not reach the other replica within a second"
            await asyncio.sleep(0.05)

    # pip on the second replica resolves the release left (the prerelease in the range is blocked too).
    target = tmp_path / "replica"
    simple = f"{second.url}/registries/pypi/simple/"
    result = await asyncio.to_thread(pip_install, simple, ["shared-lib", "--pre"], target, client_env(tmp_path))
    assert result.returncode == 0, output(result)
    assert installed(target, "shared-lib") == "1.0"
