"""Property-based: whatever a client sends, the hub never answers 5xx, and whatever it accepted it
serves again. Hypothesis generates publish bodies, package names and versions, headers and admin
query strings; one hub (in process, SQLite, npm local registry) answers them all.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batlehub.app import create_app
from batlehub.config import parse_settings

T = TypeVar("T")
ADMIN = "prop-admin-token-0123456789"
ALICE = "prop-alice-token-0123456789"
EXAMPLES = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


class Hub:
    """A hub on its own event loop in a thread, so synchronous Hypothesis tests can drive it."""

    def __init__(self, data_dir: Path) -> None:
        raw = {
            "auth": [
                {
                    "type": "token",
                    "tokens": [
                        {"value": ADMIN, "role": "admin", "user_id": "admin"},
                        {"value": ALICE, "role": "user", "user_id": "alice"},
                    ],
                }
            ],
            "registries": [{"type": "npm", "name": "npm", "mode": "local"}],
            "server": {"trusted_proxies": ["127.0.0.0/8"], "cors_allowed_origins": ["*"]},
        }
        self.settings = parse_settings(raw, data_dir=data_dir)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client: TestClient = self.run(self._start())

    async def _start(self) -> TestClient:
        client = TestClient(TestServer(create_app(self.settings)))
        await client.start_server()
        return client

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        async def go() -> tuple[int, bytes]:
            async with self.client.request(method, path, **kwargs) as response:
                return response.status, await response.read()

        return self.run(go())

    def close(self) -> None:
        self.run(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    running = Hub(tmp_path_factory.mktemp("property-hub"))
    yield running
    running.close()


def not_5xx(status: int, body: bytes) -> None:
    assert status < 500, body[:500]


# Any text: surrogates, controls, NUL, every plane.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=20,
)
names = st.one_of(
    st.from_regex(r"\A(@[a-z0-9][a-z0-9-]{0,8}/)?[a-z0-9][a-z0-9._-]{0,20}\Z"),
    any_text.filter(bool),
)
versions = st.one_of(st.from_regex(r"\A[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}(-[a-z0-9.]{1,8})?\Z"), any_text)


def sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


@EXAMPLES
@given(name=names, version=versions, extra=st.dictionaries(any_text, json_values, max_size=5), readme=any_text)
def test_any_publish_is_refused_cleanly_or_served_again(
    hub: Hub, name: str, version: str, extra: dict[str, Any], readme: str
) -> None:
    tarball = json.dumps([name, version]).encode("utf-8", "surrogatepass")
    manifest = {**extra, "name": name, "version": version, "dist": {"integrity": sri(tarball)}, "readme": readme}
    basename = name.rsplit("/", 1)[-1]
    body = {
        "_id": name,
        "name": name,
        "versions": {version: manifest},
        "_attachments": {f"{basename}-{version}.tgz": {"data": base64.b64encode(tarball).decode()}},
    }
    raw = json.dumps(body).encode()  # ensure_ascii: surrogates arrive as \ud800 escapes, as a client sends them
    path = "/registries/npm/" + quote(name, safe="@").replace("/", "%2f")
    status, answer = hub.request("PUT", path, data=raw, headers={"Authorization": f"Bearer {ALICE}"})
    not_5xx(status, answer)
    if status != 201:
        return
    # Accepted: every form of it answers, and the tarball is the bytes that were sent.
    for suffix, headers in (
        ("", {}),
        ("", {"Accept": "application/vnd.npm.install-v1+json"}),
        ("?write=true", {"Authorization": f"Bearer {ALICE}"}),
        ("/" + quote(version, safe=""), {}),
    ):
        got, text = hub.request("GET", path + suffix, headers=headers)
        assert got == 200, (suffix, text[:300])
    doc = json.loads(hub.request("GET", path)[1])
    url = doc["versions"][version]["dist"]["tarball"]
    got, data = hub.request("GET", url.split(str(hub.client.make_url("")), 1)[-1])
    assert got == 200 and data == tarball


@EXAMPLES
@given(segments=st.lists(any_text, min_size=1, max_size=4), method=st.sampled_from(["GET", "PUT", "DELETE", "HEAD"]))
def test_any_path_under_a_registry_is_not_a_5xx(hub: Hub, segments: list[str], method: str) -> None:
    path = "/registries/npm/" + "/".join(quote(s.encode("utf-8", "surrogatepass"), safe="@%") for s in segments)
    not_5xx(*hub.request(method, path, data=b"{}", headers={"Authorization": f"Bearer {ALICE}"}))


header_values = st.text(st.characters(min_codepoint=32, max_codepoint=0x7E), max_size=80)


@EXAMPLES
@given(
    authorization=st.one_of(
        header_values,
        header_values.map(lambda v: "Bearer " + v),
        header_values.map(lambda v: "Basic " + base64.b64encode(v.encode()).decode()),
    ),
    forwarded=header_values,
    accept=header_values,
    if_none_match=header_values,
    origin=header_values,
)
def test_any_headers_are_not_a_5xx(
    hub: Hub, authorization: str, forwarded: str, accept: str, if_none_match: str, origin: str
) -> None:
    headers = {
        "Authorization": authorization,
        "X-Forwarded-For": forwarded,
        "Accept": accept,
        "If-None-Match": if_none_match,
        "Origin": origin,
    }
    for path in ("/registries/npm/some-package", "/api/v1/banner", "/registries/npm/-/whoami"):
        not_5xx(*hub.request("GET", path, headers=headers))


@EXAMPLES
@given(
    query=st.dictionaries(
        st.sampled_from(["registry", "user", "action", "since", "until", "limit", "offset", "denied_only"]),
        any_text,
        max_size=5,
    )
)
def test_any_audit_log_query_is_not_a_5xx(hub: Hub, query: dict[str, str]) -> None:
    encoded = "&".join(f"{k}={quote(v.encode('utf-8', 'surrogatepass'), safe='')}" for k, v in query.items())
    not_5xx(*hub.request("GET", f"/api/v1/admin/audit-log?{encoded}", headers={"Authorization": f"Bearer {ADMIN}"}))


@EXAMPLES
@given(body=json_values)
def test_any_json_to_the_admin_api_is_not_a_5xx(hub: Hub, body: Any) -> None:
    raw = json.dumps(body).encode()
    for method, path in (
        ("POST", "/api/v1/admin/tokens"),
        ("POST", "/api/v1/admin/ip-blocks"),
        ("PUT", "/api/v1/admin/banner"),
        ("PUT", "/api/v1/admin/registries/npm/owners/some-package"),
        ("PUT", "/api/v1/admin/registries/npm/reserved/some-package"),
        ("PUT", "/registries/npm/-/package/some-package/dist-tags/next"),
    ):
        not_5xx(*hub.request(method, path, data=raw, headers={"Authorization": f"Bearer {ADMIN}"}))
