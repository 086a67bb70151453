"""npm's part of the embedded default: with no `[[registries]]` configured, one hybrid registry
named `npm` that proxies the registry the user's own npm client is configured with
(`NPM_CONFIG_REGISTRY`, else `npm config get registry`; core's `ClientConfig` reads it), and the
two `.npmrc` lines that point npm at it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from batlehub.api import ClientConfig, DefaultRegistry, Settings

NAME = "npm"
NPM_CLIENT = ClientConfig(
    env_keys=("NPM_CONFIG_REGISTRY", "npm_config_registry"),
    programs=("npm",),
    config_get=("config", "get", "registry"),
    client="your npm client",
    noun="registry",
    missing="no npm client configuration found",
    add_upstream=(
        'add a [[registries]] entry (type = "npm", name = "npm", mode = "hybrid",'
        ' upstreams = ["<your upstream registry URL>"]) or set NPM_CONFIG_REGISTRY before starting'
    ),
)


def default_registry(settings: Settings) -> DefaultRegistry:
    return NPM_CLIENT.default_registry(NAME, settings)


def usage(registry_url: str) -> list[str]:
    parts = urlsplit(registry_url)
    return [
        "in ~/.npmrc, or the project's .npmrc:",
        f"registry={registry_url}",
        f"//{parts.netloc}{parts.path}:_authToken=<a token, to publish; reading needs none>",
    ]
