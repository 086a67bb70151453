"""batlehub-npm: the npm registry format for BatleHub.

Implements the `register_registry_formats` hook: `[[registries]] type = "npm"` serves a full npm
registry (for the npm, pnpm and yarn clients) under `/registries/{name}/`, in proxy, local or
hybrid mode; and the `package_page` hook: what the web UI shows of an npm package. Built on the
plugin surface `batlehub.api` alone. See README.md for configuration and client setup.
"""

from __future__ import annotations

from aiohttp import web

from batlehub.api import PackagePage, Registry, RegistryFormatType, hookimpl, semver_range
from batlehub_npm import defaults
from batlehub_npm.names import normalize_name, redact_path, scope_of
from batlehub_npm.options import NpmOptions
from batlehub_npm.registry import NpmRegistry

__all__ = ["NpmRegistry", "package_page", "register_registry_formats"]


@hookimpl
def register_registry_formats() -> list[RegistryFormatType]:
    return [
        RegistryFormatType(
            name="npm",
            description="npm registry for npm, pnpm and yarn: proxies upstream registries, hosts private packages",
            config_model=NpmOptions,
            factory=NpmRegistry,
            scope_of=scope_of,
            normalize_name=normalize_name,
            redact_path=redact_path,
            default_registry=defaults.default_registry,
            usage=defaults.usage,
            version_range=semver_range,
        )
    ]


@hookimpl
async def package_page(registry: Registry, name: str, version: str | None, request: web.Request) -> PackagePage | None:
    if not isinstance(registry, NpmRegistry):
        return None
    return await registry.package_page(request, name, version)
