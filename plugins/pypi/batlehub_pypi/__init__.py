"""batlehub-pypi: the PyPI format for BatleHub.

Implements the `register_registry_formats` hook: `[[registries]] type = "pypi"` serves a Python
package index (the simple repository API for pip and uv, the JSON API, and the upload API for
twine and `uv publish`) under `/registries/{name}/`, in proxy, local or hybrid mode; and the
`package_page` hook: what the web UI shows of a Python project. Built on the plugin surface
`batlehub.api` alone. With no `[[registries]]` configured it offers one hybrid
registry named `pypi` (`defaults`). See README.md for configuration and client setup.
"""

from __future__ import annotations

from aiohttp import web

from batlehub.api import PackagePage, Registry, RegistryFormatType, hookimpl
from batlehub_pypi import defaults
from batlehub_pypi.names import normalize_name, pep440_range
from batlehub_pypi.options import PypiOptions
from batlehub_pypi.registry import PypiRegistry

__all__ = ["PypiRegistry", "package_page", "register_registry_formats"]


@hookimpl
def register_registry_formats() -> list[RegistryFormatType]:
    return [
        RegistryFormatType(
            name="pypi",
            description="Python package index for pip, uv and twine: proxies upstream indexes, hosts private packages",
            config_model=PypiOptions,
            factory=PypiRegistry,
            normalize_name=normalize_name,
            default_registry=defaults.default_registry,
            usage=defaults.usage,
            version_range=pep440_range,
        )
    ]


@hookimpl
async def package_page(registry: Registry, name: str, version: str | None, request: web.Request) -> PackagePage | None:
    """What the web UI shows of a Python project (see `web_page`)."""
    if not isinstance(registry, PypiRegistry):
        return None
    return await registry.package_page(request, name, version)
