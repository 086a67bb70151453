"""The PyPI format's embedded default: the index the user's pip or uv uses becomes the upstream,
never the hub itself, and the start-up guide says what to paste."""

from __future__ import annotations

from pathlib import Path

import pytest
from batlehub_pypi.defaults import default_registry, usage

from batlehub.config import parse_settings


@pytest.fixture(autouse=True)
def no_client_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("PIP_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no pip to ask


def test_the_users_index_is_proxied(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UV_DEFAULT_INDEX", "http://127.0.0.1:9/simple/")
    offer = default_registry(parse_settings({}, data_dir=tmp_path))
    assert offer.options == {"mode": "hybrid", "upstreams": ["http://127.0.0.1:9/simple/"]}
    assert "from UV_DEFAULT_INDEX" in offer.note


def test_nothing_found_or_the_hub_itself_proxies_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = parse_settings({"server": {"port": 8123}}, data_dir=tmp_path)
    offer = default_registry(settings)
    assert offer.options["upstreams"] == [] and "PIP_INDEX_URL" in offer.note
    monkeypatch.setenv("PIP_INDEX_URL", "http://localhost:8123/registries/pypi/simple/")
    offer = default_registry(settings)
    assert offer.options["upstreams"] == [] and "already uses this hub" in offer.note


def test_usage_names_pip_uv_and_twine() -> None:
    lines = usage("http://hub.test:8080/registries/pypi/")
    assert "index-url = http://hub.test:8080/registries/pypi/simple/" in lines
    assert any("twine upload --repository-url http://hub.test:8080/registries/pypi/ -u __token__" in x for x in lines)
