"""Who the client is, and what our own address looks like to it: forwarding headers are believed
only from `trusted_proxies`, walked from the right."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from batlehub import appkeys, net
from batlehub.config import parse_settings
from batlehub.net import client_ip, is_trusted
from batlehub.requests import base_url as external_base_url


def nets(*cidrs: str) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


LB = nets("10.0.0.0/8", "fd00::/8")


@pytest.mark.parametrize(
    ("peer", "headers", "trusted", "expected"),
    [
        # No trusted proxies: the peer, whatever the headers say.
        ("203.0.113.1", {}, (), "203.0.113.1"),
        ("203.0.113.1", {"X-Forwarded-For": "198.51.100.9"}, (), "203.0.113.1"),
        ("203.0.113.1", {"X-Real-IP": "198.51.100.9"}, (), "203.0.113.1"),
        # A peer outside trusted_proxies is the client even when other proxies are trusted.
        ("203.0.113.1", {"X-Forwarded-For": "198.51.100.9"}, LB, "203.0.113.1"),
        # Trusted peer: the rightmost untrusted hop is the client.
        ("10.0.0.2", {"X-Forwarded-For": "198.51.100.9"}, LB, "198.51.100.9"),
        ("10.0.0.2", {"X-Forwarded-For": "1.1.1.1, 198.51.100.9, 10.0.0.7"}, LB, "198.51.100.9"),
        ("10.0.0.2", {"X-Forwarded-For": "1.1.1.1,198.51.100.9"}, LB, "198.51.100.9"),
        # Every hop trusted: the leftmost is as far as we can see.
        ("10.0.0.2", {"X-Forwarded-For": "10.0.0.9, 10.0.0.8"}, LB, "10.0.0.9"),
        # Garbage in the chain stops the walk; we fall back to what we know.
        ("10.0.0.2", {"X-Forwarded-For": "198.51.100.9, not-an-ip"}, LB, "10.0.0.2"),
        # X-Real-IP from a trusted peer when there is no X-Forwarded-For.
        ("10.0.0.2", {"X-Real-IP": "198.51.100.9"}, LB, "198.51.100.9"),
        ("10.0.0.2", {}, LB, "10.0.0.2"),
        # Addresses with ports, IPv6, IPv4-mapped IPv6.
        ("10.0.0.2", {"X-Forwarded-For": "198.51.100.9:5555"}, LB, "198.51.100.9"),
        ("10.0.0.2", {"X-Forwarded-For": "[2001:db8::5]:443"}, LB, "2001:db8::5"),
        ("fd00::1", {"X-Forwarded-For": "2001:db8::5"}, LB, "2001:db8::5"),
        ("::ffff:10.0.0.2", {"X-Forwarded-For": "198.51.100.9"}, LB, "198.51.100.9"),
        ("::ffff:203.0.113.1", {}, (), "203.0.113.1"),
    ],
)
def test_client_ip(peer: str, headers: dict[str, str], trusted: tuple[Any, ...], expected: str) -> None:
    assert client_ip(peer, headers, trusted) == expected


def test_ignored_forwarding_is_logged_once_per_peer_naming_the_setting(caplog: pytest.LogCaptureFixture) -> None:
    net._warned_peers.discard("192.0.2.200")
    caplog.set_level(logging.WARNING, logger="batlehub.net")
    for _ in range(3):
        client_ip("192.0.2.200", {"X-Forwarded-For": "198.51.100.9"}, ())
    warnings = [r.getMessage() for r in caplog.records if "192.0.2.200" in r.getMessage()]
    assert len(warnings) == 1
    assert "server.trusted_proxies" in warnings[0]


def test_is_trusted() -> None:
    assert is_trusted("10.1.2.3", LB)
    assert is_trusted("::ffff:10.1.2.3", LB)
    assert not is_trusted("11.1.2.3", LB)
    assert not is_trusted("10.1.2.3", ())
    assert not is_trusted("garbage", LB)
    assert not is_trusted(None, LB)


def _request(tmp_path: Path, headers: dict[str, str], peer: str, **server: Any) -> web.Request:
    settings = parse_settings({"registries": [], "server": server}, data_dir=tmp_path)
    app = web.Application()
    app[appkeys.SETTINGS] = settings
    transport_peer = (peer, 40000)

    class Transport:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return transport_peer if name == "peername" else default

        def is_closing(self) -> bool:
            return False

    return make_mocked_request("GET", "/x", headers=headers, app=app, transport=Transport())


def test_external_base_url_from_host(tmp_path: Path) -> None:
    request = _request(tmp_path, {"Host": "hub.internal:8080", "X-Forwarded-Proto": "https"}, "203.0.113.1")
    assert external_base_url(request) == "http://hub.internal:8080"  # the forwarded proto is not believed


def test_external_base_url_from_trusted_proxy(tmp_path: Path) -> None:
    request = _request(
        tmp_path,
        {"Host": "10.0.0.5:8080", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "hub.corp.internal"},
        "10.0.0.2",
        trusted_proxies=["10.0.0.0/8"],
    )
    assert external_base_url(request) == "https://hub.corp.internal"


def test_public_url_wins(tmp_path: Path) -> None:
    request = _request(
        tmp_path,
        {"Host": "10.0.0.5:8080", "X-Forwarded-Host": "x"},
        "10.0.0.2",
        trusted_proxies=["10.0.0.0/8"],
        public_url="https://hub.corp.internal/base/",
    )
    assert external_base_url(request) == "https://hub.corp.internal/base"
