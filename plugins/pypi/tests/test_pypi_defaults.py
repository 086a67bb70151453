"""The PyPI format's embedded default: the index the user's pip or uv uses becomes the upstream,
never the hub itself, and the start-up guide says what to paste."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
from batlehub_pypi.defaults import default_registry, usage

from batlehub.config import parse_settings
from batlehub.testing.hub import CLOSED_UPSTREAM, serve_env


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


# --- with the installed pip ------------------------------------------------------------------------

PIP_BIN = Path(sys.executable).parent  # the pip installed beside this interpreter


def pips_own_default() -> str:
    """What the installed pip uses when nothing is configured, read from pip itself."""
    return str(importlib.import_module("pip._internal.models.index").PyPI.simple_url)


@pytest.fixture
def with_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not (PIP_BIN / "pip").exists() and not (PIP_BIN / "pip3").exists():
        pytest.skip("no pip beside this interpreter")
    monkeypatch.setenv("PATH", str(PIP_BIN))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no pip.conf of this machine's either


def test_with_nothing_configured_the_upstream_is_pips_own_default(with_pip: None, tmp_path: Path) -> None:
    offer = default_registry(parse_settings({}, data_dir=tmp_path))
    assert offer.options == {"mode": "hybrid", "upstreams": [pips_own_default()]}
    assert "pip's own default" in offer.note and "install --help" in offer.note


def test_a_configured_index_wins_over_pips_default(
    with_pip: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = parse_settings({"server": {"port": 8123}}, data_dir=tmp_path)
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = http://127.0.0.1:9/from-pip-conf/simple/\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))  # read by the real `pip config get`
    offer = default_registry(settings)
    assert offer.options["upstreams"] == ["http://127.0.0.1:9/from-pip-conf/simple/"]
    assert "pip config get global.index-url" in offer.note
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/from-env/simple/")
    assert default_registry(settings).options["upstreams"] == ["http://127.0.0.1:9/from-env/simple/"]

    # A pip already configured for this hub: no loop, and the log says why nothing is proxied.
    monkeypatch.delenv("PIP_INDEX_URL")
    conf.write_text("[global]\nindex-url = http://localhost:8123/registries/pypi/simple/\n")
    offer = default_registry(settings)
    assert offer.options["upstreams"] == [] and "already uses this hub" in offer.note
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:8123/registries/pypi/simple/")
    offer = default_registry(settings)
    assert offer.options["upstreams"] == [] and "already uses this hub" in offer.note


def test_a_test_hub_never_proxies_pips_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:1/somewhere/simple/")
    monkeypatch.setenv("UV_DEFAULT_INDEX", "http://127.0.0.1:1/somewhere/simple/")
    env = serve_env()
    assert env["PIP_INDEX_URL"] == CLOSED_UPSTREAM + "simple/" and env["NPM_CONFIG_REGISTRY"] == CLOSED_UPSTREAM
    assert "UV_DEFAULT_INDEX" not in env
    assert serve_env({"PIP_INDEX_URL": "http://127.0.0.1:2/simple/"})["PIP_INDEX_URL"] == "http://127.0.0.1:2/simple/"
