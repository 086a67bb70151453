"""The PyPI format's own keys of a `[[registries]]` entry: mode, upstream indexes, extra download
origins and the proxy cache.

`PypiOptions` is the format's `config_model`: core validates an entry with it (reporting each
problem by its key, `registries[0].upstreams[1]: ...`) and the registry reads the result from
`RegistrySettings.validated_options(PypiOptions)`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from batlehub.api import ConfigList, ConfigModel

Mode = Literal["proxy", "local", "hybrid"]


def _http_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    # Project paths are joined onto it, so it must end with exactly one slash.
    return url.rstrip("/") + "/"


class PypiCacheOptions(ConfigModel):
    """The `cache` table of a PyPI registry: how upstream project pages are kept."""

    metadata_ttl_secs: float = Field(default=300.0, ge=0)
    """How long a fetched project page is served without asking the upstream again."""
    serve_stale: bool = True
    """Serve an expired project page while the upstream is down, rather than failing."""


class PypiOptions(ConfigModel):
    """The PyPI format's keys of a `[[registries]]` entry."""

    mode: Mode = "hybrid"
    upstreams: ConfigList[Annotated[str, AfterValidator(_http_url)]] = Field(default=(), validate_default=True)
    """Simple-index URLs (`http://host:port/simple/`), tried in order; each ends with `/`."""
    files_hosts: ConfigList[Annotated[str, AfterValidator(_http_url)]] = ()
    """Other origins (scheme, host and port) the upstreams' file links may point at: many indexes
    serve their files from a host of their own. The hub downloads from the upstreams and these
    only."""
    cache: PypiCacheOptions = Field(default_factory=PypiCacheOptions)

    @field_validator("upstreams")
    @classmethod
    def _proxy_needs_upstreams(cls, upstreams: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if info.data.get("mode") == "proxy" and not upstreams:
            raise ValueError('required when mode = "proxy" (the upstream index URLs to cache)')
        return upstreams
