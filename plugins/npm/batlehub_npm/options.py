"""The npm format's own keys of a `[[registries]]` entry: what core's `ProxyOptions` has (mode,
upstreams, the proxy cache) and the packages to warm at start.

`NpmOptions` is the format's `config_model`: core validates an entry with it (reporting each
problem by its key, `registries[0].upstreams[1]: ...`) and the registry reads the result from
`RegistrySettings.validated_options(NpmOptions)`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from batlehub.api import BatleHubError, ConfigList, ProxyCacheOptions, ProxyOptions
from batlehub_npm.names import parse_package_name, split_spec, validate_version


def _warm_spec(spec: str) -> str:
    name, version = split_spec(spec)
    try:
        parse_package_name(name)
        if version is not None:
            validate_version(version)
    except BatleHubError as exc:
        raise ValueError(exc.message) from None
    return spec


class NpmCacheOptions(ProxyCacheOptions):
    """The `cache` table of an npm registry: how upstream packuments are kept."""

    warm_packages: ConfigList[Annotated[str, AfterValidator(_warm_spec)]] = ()
    """`name` or `name@version`, fetched at start so the first client does not wait."""


class NpmOptions(ProxyOptions):
    """The npm format's keys of a `[[registries]]` entry."""

    upstream_noun = "upstream registry URLs"
    cache: NpmCacheOptions = Field(default_factory=NpmCacheOptions)
