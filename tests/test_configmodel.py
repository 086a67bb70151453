"""Descriptor config models: pydantic's errors read like the core's own settings problems, one
line each, named by the key path an operator edits."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pytest
from pydantic import AfterValidator, Field, ValidationError

from batlehub.configmodel import ConfigList, ConfigModel, forbids_unknown_keys, problems_of


def _scheme(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    return url


class Inner(ConfigModel):
    ttl_secs: float = Field(default=300.0, ge=0)
    stale: bool = True
    names: ConfigList[str] = ()


class Outer(ConfigModel):
    mode: Literal["proxy", "local", "hybrid"] = "hybrid"
    url: str = Field(examples=["http://127.0.0.1:4873/"])
    mirrors: ConfigList[Annotated[str, AfterValidator(_scheme)]] = ()
    workers: int = Field(default=1, ge=1, le=64)
    label: Annotated[str, Field(min_length=1)] = "x"
    inner: Inner = Field(default_factory=Inner)
    tables: ConfigList[Inner] = ()


def problems(data: dict[str, Any], path: str = "registries[0]") -> list[str]:
    with pytest.raises(ValidationError) as info:
        Outer.model_validate(data)
    return problems_of(info.value, Outer, path=path, owner="type 'demo'", table_keys={"type", "name"})


def test_valid_config_is_typed_and_immutable() -> None:
    config = Outer.model_validate({"url": "http://u", "mirrors": ["http://m"], "inner": {"ttl_secs": 5}})
    assert config.mirrors == ("http://m",)  # a TOML array, kept as a tuple
    assert config.inner.ttl_secs == 5.0  # an integer is a number
    with pytest.raises(ValidationError):
        config.workers = 2
    assert forbids_unknown_keys(Outer)


def test_each_problem_names_its_key_path() -> None:
    found = problems(
        {
            "mode": "mirror",
            "mirrors": ["http://ok", "ftp://x", 3],
            "workers": 0,
            "label": "",
            "inner": {"ttl_secs": "soon", "stale": "yes", "names": "a", "colour": 1},
            "tables": [{}, {"ttl_secs": -1}],
            "nmae": "typo",
        }
    )
    assert found == [
        "registries[0].mode: expected one of proxy, local, hybrid, got 'mirror'",
        "registries[0].url: required (e.g. 'http://127.0.0.1:4873/')",
        "registries[0].mirrors[1]: expected an http:// or https:// URL, got 'ftp://x'",
        "registries[0].mirrors[2]: expected a string, got 3",
        "registries[0].workers: must be at least 1, got 0",
        "registries[0].label: must not be empty",
        "registries[0].inner.ttl_secs: expected a number, got 'soon'",
        "registries[0].inner.stale: expected true or false, got 'yes'",
        "registries[0].inner.names: expected a list of strings, got 'a'",
        "registries[0].inner.colour: unknown key (known: names, stale, ttl_secs)",
        "registries[0].tables[1].ttl_secs: must be at least 0, got -1",
        "registries[0].nmae: unknown key for type 'demo'"
        " (known: inner, label, mirrors, mode, name, tables, type, url, workers)",
    ]


def test_strict_like_the_core_settings() -> None:
    """TOML has types: a quoted number or a 1 for true is a mistake worth reporting."""
    found = problems({"url": 5, "workers": True, "inner": {"stale": 1, "ttl_secs": float("inf")}}, path="cache")
    assert found == [
        "cache.url: expected a string, got 5",
        "cache.workers: expected an integer, got True",
        "cache.inner.ttl_secs: expected a finite number, got inf",
        "cache.inner.stale: expected true or false, got 1",
    ]


def test_a_table_where_a_value_belongs_and_the_reverse() -> None:
    assert problems({"url": "http://u", "inner": 3, "mirrors": {"a": 1}}) == [
        "registries[0].mirrors: expected a list of strings, got {'a': 1}",
        "registries[0].inner: expected a table, got 3",
    ]
