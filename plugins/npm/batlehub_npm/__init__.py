"""batlehub-npm: the npm registry format for BatleHub.

Implements the `register_registry_formats` hook: `[[registries]] type = "npm"` serves a full npm
registry (for the npm, pnpm and yarn clients) under `/registries/{name}/`, in proxy, local or
hybrid mode. See README.md for configuration and client setup.
"""

from __future__ import annotations

from batlehub.interfaces import RegistryFormatType
from batlehub.plugins import hookimpl
from batlehub_npm.registry import NpmRegistry, validate_options

__all__ = ["NpmRegistry", "register_registry_formats"]


@hookimpl
def register_registry_formats() -> list[RegistryFormatType]:
    return [
        RegistryFormatType(
            name="npm",
            description="npm registry for npm, pnpm and yarn: proxies upstream registries, hosts private packages",
            validate=validate_options,
            factory=NpmRegistry,
        )
    ]
