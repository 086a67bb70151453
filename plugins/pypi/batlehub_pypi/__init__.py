"""batlehub-pypi: the PyPI format for BatleHub.

Implements the `register_registry_formats` hook: `[[registries]] type = "pypi"` serves a Python
package index (the simple repository API for pip and uv, the JSON API, and the upload API for
twine and `uv publish`) under `/registries/{name}/`, in proxy, local or hybrid mode. Built on the
plugin surface `batlehub.api` alone. With no `[[registries]]` configured it offers one hybrid
registry named `pypi` (`defaults`). See README.md for configuration and client setup.
"""

from __future__ import annotations

from batlehub.api import RegistryFormatType, hookimpl
from batlehub_pypi import defaults
from batlehub_pypi.names import normalize_name, pep440_range
from batlehub_pypi.options import PypiOptions
from batlehub_pypi.registry import PypiRegistry

__all__ = ["PypiRegistry", "register_registry_formats"]


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
