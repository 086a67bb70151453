"""The npm format's own keys of a `[[registries]]` entry: mode, upstreams and the proxy cache.

`NpmOptions` is the format's `config_model`: core validates an entry with it (reporting each
problem by its key, `registries[0].upstreams[1]: ...`) and the registry reads the result from
`RegistrySettings.validated_options(NpmOptions)`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from batlehub.api import BatleHubError, ConfigList, ConfigModel
from batlehub_npm.names import parse_package_name, split_spec, validate_version

Mode = Literal["proxy", "local", "hybrid"]
MODES: tuple[Mode, ...] = ("proxy", "local", "hybrid")


def _upstream_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    # Document and tarball paths are joined onto it, so it must end with exactly one slash.
    return url.rstrip("/") + "/"


def _warm_spec(spec: str) -> str:
    name, version = split_spec(spec)
    try:
        parse_package_name(name)
        if version is not None:
            validate_version(version)
    except BatleHubError as exc:
        raise ValueError(exc.message) from None
    return spec


class NpmCacheOptions(ConfigModel):
    """The `cache` table of an npm registry: how upstream metadata is kept."""

    metadata_ttl_secs: float = Field(default=300.0, ge=0)
    """How long a fetched packument is served without asking the upstream again."""
    serve_stale: bool = True
    """Serve an expired packument while the upstream is down, rather than failing."""
    warm_packages: ConfigList[Annotated[str, AfterValidator(_warm_spec)]] = ()
    """`name` or `name@version`, fetched at start so the first client does not wait."""


class NpmOptions(ConfigModel):
    """The npm format's keys of a `[[registries]]` entry."""

    mode: Mode = "hybrid"
    upstreams: ConfigList[Annotated[str, AfterValidator(_upstream_url)]] = Field(default=(), validate_default=True)
    """Upstream registry URLs, tried in order; each ends with `/`."""
    cache: NpmCacheOptions = Field(default_factory=NpmCacheOptions)

    @field_validator("upstreams")
    @classmethod
    def _proxy_needs_upstreams(cls, upstreams: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if info.data.get("mode") == "proxy" and not upstreams:
            raise ValueError('required when mode = "proxy" (the upstream registry URLs to cache)')
        return upstreams
