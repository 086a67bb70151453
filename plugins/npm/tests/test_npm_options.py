"""The npm format's own config keys, through its config model as core validates it: every problem
named by its key, so `batlehub check-config` can list them all at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from batlehub_npm.options import NpmCacheOptions, NpmOptions
from batlehub_npm.registry import NpmRegistry

from batlehub import appkeys
from batlehub.app import create_app, validate_config
from batlehub.config import parse_settings
from batlehub.errors import ConfigError
from batlehub.interfaces import RegistryFormatType
from batlehub.plugins import flatten, get_plugin_manager


@pytest.fixture(scope="module")
def npm_type() -> RegistryFormatType:
    (npm,) = [f for f in flatten(get_plugin_manager().hook.register_registry_formats()) if f.name == "npm"]
    return npm


def validated(npm_type: RegistryFormatType, entry: dict[str, Any]) -> Any:
    return validate_config(npm_type, {"type": "npm", "name": "npm", **entry}, path="registries[0]")


def problems(npm_type: RegistryFormatType, entry: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validated(npm_type, entry)
    return info.value.problems


def test_the_descriptor_declares_its_model(npm_type: RegistryFormatType) -> None:
    assert npm_type.config_model is NpmOptions


def test_defaults_are_hybrid_without_upstreams(npm_type: RegistryFormatType) -> None:
    options = validated(npm_type, {})
    assert options == NpmOptions()
    assert (options.mode, options.upstreams) == ("hybrid", ())
    assert options.cache == NpmCacheOptions(metadata_ttl_secs=300.0, serve_stale=True, warm_packages=())


def test_every_problem_is_named_by_its_key(npm_type: RegistryFormatType) -> None:
    found = problems(
        npm_type,
        {
            "mode": "mirror",
            "upstreams": ["http://127.0.0.1:4873", "ftp://x"],
            "colour": "blue",
            "cache": {"foo": 1, "metadata_ttl_secs": "soon", "serve_stale": "yes", "warm_packages": ["..", "ok@1"]},
        },
    )
    assert found == [
        "registries[0].mode: expected one of proxy, local, hybrid, got 'mirror'",
        "registries[0].upstreams[1]: expected an http:// or https:// URL, got 'ftp://x'",
        "registries[0].cache.metadata_ttl_secs: expected a number, got 'soon'",
        "registries[0].cache.serve_stale: expected true or false, got 'yes'",
        "registries[0].cache.warm_packages[0]: invalid package name '..': path traversal is not allowed",
        "registries[0].cache.warm_packages[1]: invalid version '1': expected a semver version such as 1.2.3",
        "registries[0].cache.foo: unknown key (known: metadata_ttl_secs, serve_stale, warm_packages)",
        "registries[0].colour: unknown key for type 'npm'"
        " (known: cache, mode, name, policy, quota, rate_limit, rbac, retention, type, upstreams)",
    ]


def test_values_of_the_wrong_shape(npm_type: RegistryFormatType) -> None:
    assert problems(npm_type, {"upstreams": "http://127.0.0.1:4873/", "cache": {"metadata_ttl_secs": -1}}) == [
        "registries[0].upstreams: expected a list of strings, got 'http://127.0.0.1:4873/'",
        "registries[0].cache.metadata_ttl_secs: must be at least 0, got -1",
    ]
    assert problems(npm_type, {"cache": []}) == ["registries[0].cache: expected a table, got []"]


def test_a_proxy_needs_upstreams(npm_type: RegistryFormatType) -> None:
    assert problems(npm_type, {"mode": "proxy"}) == [
        'registries[0].upstreams: required when mode = "proxy" (the upstream registry URLs to cache)'
    ]
    assert validated(npm_type, {"mode": "proxy", "upstreams": ["http://127.0.0.1:4873/"]}).mode == "proxy"


def test_upstreams_end_with_one_slash_and_warm_specs_are_kept(npm_type: RegistryFormatType) -> None:
    options = validated(
        npm_type,
        {
            "upstreams": ["http://a.test", "https://b.test/npm//"],
            "cache": {"metadata_ttl_secs": 0, "warm_packages": ["left-pad", "@scope/pkg@1.2.3"]},
        },
    )
    assert options.upstreams == ("http://a.test/", "https://b.test/npm/")
    assert options.cache.metadata_ttl_secs == 0.0
    assert options.cache.warm_packages == ("left-pad", "@scope/pkg@1.2.3")


async def test_the_registry_is_built_from_its_validated_options(tmp_path: Path) -> None:
    """create_app hands NpmRegistry the validated model; the proxy takes its settings from it."""
    entry = {
        "type": "npm",
        "name": "mirror",
        "mode": "proxy",
        "upstreams": ["http://127.0.0.1:9"],
        "cache": {"metadata_ttl_secs": 5, "serve_stale": False, "warm_packages": ["left-pad"]},
    }
    app = create_app(parse_settings({"registries": [entry]}, data_dir=tmp_path))  # constructs only: no I/O
    registry = app[appkeys.REGISTRIES]["mirror"]
    assert isinstance(registry, NpmRegistry)
    assert app[appkeys.SETTINGS].registry("mirror") is registry.settings
    assert isinstance(registry.settings.options, NpmOptions)
    assert registry.proxy is not None
    assert registry.proxy.upstreams == ["http://127.0.0.1:9/"]
    assert (registry.proxy.documents.metadata_ttl_secs, registry.proxy.documents.serve_stale) == (5.0, False)
    assert registry.proxy.warm_packages == ["left-pad"]
