"""Typed keys for what lives on the aiohttp application and on each request."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    import pluggy

    from batlehub.accesslog import AccessLog
    from batlehub.auth import Authenticator
    from batlehub.config import RegistrySettings, Settings
    from batlehub.db import Database
    from batlehub.interfaces import CacheBackend, Registry, RegistryServices, StorageBackend
    from batlehub.state import HubState

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
PLUGIN_MANAGER: web.AppKey[pluggy.PluginManager] = web.AppKey("plugin_manager")
DATABASE: web.AppKey[Database] = web.AppKey("database")
CACHE: web.AppKey[CacheBackend] = web.AppKey("cache")
STORAGE: web.AppKey[StorageBackend] = web.AppKey("storage")
AUTH: web.AppKey[Authenticator] = web.AppKey("auth")
SERVICES: web.AppKey[RegistryServices] = web.AppKey("services")
REGISTRIES: web.AppKey[dict[str, Registry]] = web.AppKey("registries")
STATE: web.AppKey[HubState] = web.AppKey("state")
"""Process-wide runtime state (shutting down, warnings for health)."""
ACCESS_LOG: web.AppKey[AccessLog] = web.AppKey("access_log")

# Set on sub-applications of registries, so handlers find their own settings.
REGISTRY_SETTINGS: web.AppKey[RegistrySettings] = web.AppKey("registry_settings")

# Per-request values set by the middleware pipeline (request[...]). Typed `web.RequestKey`s where
# aiohttp has them: from aiohttp 3.13 on, a plain string key warns on every process's first request.
if hasattr(web, "RequestKey"):
    CLIENT_IP: Any = web.RequestKey("client_ip", str)
    IDENTITY: Any = web.RequestKey("identity", object)
    RESPONSE_USER: Any = web.RequestKey("log_user", str)
else:  # pragma: no cover - aiohttp < 3.13
    CLIENT_IP = "batlehub.client_ip"
    IDENTITY = "batlehub.identity"
    RESPONSE_USER = "batlehub.log_user"

__all__ = [name for name in dir() if name.isupper()]
