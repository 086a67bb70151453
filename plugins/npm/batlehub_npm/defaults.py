"""npm's part of the embedded default: with no `[[registries]]` configured, one hybrid registry
named `npm` that proxies the registry the user's own npm client is configured with, and the two
`.npmrc` lines that point npm at it.

The upstream is read from the user's configuration (`NPM_CONFIG_REGISTRY`, else
`npm config get registry`): the project names no registry itself. A configuration that already
points at this hub would make it its own upstream; that is detected and said instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from urllib.parse import urlsplit

from batlehub.api import DefaultRegistry, Settings, points_at_this_hub

NAME = "npm"
_ENV_KEYS = ("NPM_CONFIG_REGISTRY", "npm_config_registry")
_ADD_UPSTREAM = (
    'add a [[registries]] entry (type = "npm", name = "npm", mode = "hybrid",'
    ' upstreams = ["<your upstream registry URL>"]) or set NPM_CONFIG_REGISTRY before starting'
)


def default_registry(settings: Settings) -> DefaultRegistry:
    url, source = user_registry()
    if url is None:
        return DefaultRegistry(
            NAME,
            {"mode": "hybrid", "upstreams": []},
            note=f"no npm client configuration found, so nothing is proxied: {_ADD_UPSTREAM}",
        )
    if points_at_this_hub(url, settings):
        return DefaultRegistry(
            NAME,
            {"mode": "hybrid", "upstreams": []},
            note=(
                f"your npm client already uses this hub ({url}, from {source}), so it cannot be the upstream"
                f" and nothing is proxied: {_ADD_UPSTREAM}"
            ),
        )
    return DefaultRegistry(
        NAME,
        {"mode": "hybrid", "upstreams": [url]},
        note=f"proxying {url}, the registry your npm client uses (from {source})",
    )


def user_registry() -> tuple[str | None, str]:
    """The registry URL the user's npm client is configured with, and where it came from."""
    for key in _ENV_KEYS:
        value = os.environ.get(key, "").strip()
        if value:
            return (value if _is_url(value) else None), key
    npm = shutil.which("npm")
    if npm is None:
        return None, "npm is not installed"
    try:
        found = subprocess.run(
            [npm, "config", "get", "registry"], capture_output=True, text=True, timeout=15, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None, "npm config get registry failed"
    value = found.stdout.strip()
    return (value if found.returncode == 0 and _is_url(value) else None), "npm config get registry"


def usage(registry_url: str) -> list[str]:
    parts = urlsplit(registry_url)
    return [
        "in ~/.npmrc, or the project's .npmrc:",
        f"registry={registry_url}",
        f"//{parts.netloc}{parts.path}:_authToken=<a token, to publish; reading needs none>",
    ]


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))
