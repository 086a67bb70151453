"""Registry services for tests that drive a format's parts without a whole app."""

from __future__ import annotations

import aiohttp
import pluggy

from batlehub.app import installed_types
from batlehub.auth import Authenticator
from batlehub.config import RegistrySettings, Settings
from batlehub.db import Database
from batlehub.interfaces import CacheBackend, StorageBackend
from batlehub.plugins import get_plugin_manager
from batlehub.registries import RegistryServices


def registry_services(
    settings: Settings,
    registry: RegistrySettings,
    *,
    db: Database,
    cache: CacheBackend,
    storage: StorageBackend,
    http: aiohttp.ClientSession,
    pm: pluggy.PluginManager | None = None,
) -> RegistryServices:
    """What `create_app` hands a registry of `registry.type`, built on the given (open) backends;
    the backend descriptors are the installed ones named by `settings.cache` / `settings.storage`."""
    pm = pm or get_plugin_manager()
    types = installed_types(pm)
    return RegistryServices(
        settings=settings,
        registry=registry,
        format_type=types.registries[registry.type],
        db=db,
        cache=cache,
        cache_type=types.cache[str(settings.cache.get("type", "memory"))],
        storage=storage,
        storage_type=types.storage[str(settings.storage.get("type", "filesystem"))],
        tokens=Authenticator(settings, db),
        http=lambda: http,
        pm=pm,
    )
