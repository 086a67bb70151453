"""The keys every proxying registry format shares in its `[[registries]]` entry: the mode, the
upstream URLs and the `cache` table of how long upstream documents are kept.

A format's `config_model` subclasses `ProxyOptions` (and `ProxyCacheOptions` for its `cache`
table) and adds only its own keys, so `mode`, `upstreams` and `cache.metadata_ttl_secs` mean
the same, and are checked the same, whatever the format.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from batlehub.configmodel import ConfigList, ConfigModel

Mode = Literal["proxy", "local", "hybrid"]


def _http_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    # Document and file paths are joined onto it, so it must end with exactly one slash.
    return url.rstrip("/") + "/"


HttpUrl = Annotated[str, AfterValidator(_http_url)]
"""An http:// or https:// URL, kept with exactly one trailing slash."""


class ProxyCacheOptions(ConfigModel):
    """The `cache` table of a proxying registry: how upstream documents are kept."""

    metadata_ttl_secs: float = Field(default=300.0, ge=0)
    """How long a fetched upstream document is served without asking the upstream again."""
    serve_stale: bool = True
    """Serve an expired upstream document while the upstream is down, rather than failing."""


class ProxyOptions(ConfigModel):
    """The keys of a `[[registries]]` entry that every proxying format has."""

    upstream_noun: ClassVar[str] = "upstream URLs"
    """What the format's upstreams are called in the error of a proxy without any."""

    mode: Mode = "hybrid"
    upstreams: ConfigList[HttpUrl] = Field(default=(), validate_default=True)
    """Upstream URLs, tried in order; each ends with `/`."""
    cache: ProxyCacheOptions = Field(default_factory=ProxyCacheOptions)

    @field_validator("upstreams")
    @classmethod
    def _proxy_needs_upstreams(cls, upstreams: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if info.data.get("mode") == "proxy" and not upstreams:
            raise ValueError(f'required when mode = "proxy" (the {cls.upstream_noun} to cache)')
        return upstreams
