"""The application factory: settings in, a ready `web.Application` out.

Backends are chosen by name from what the plugins registered, constructed here (no I/O), and
opened and closed in their own `cleanup_ctx`, in dependency order: database (with migrations),
cache, storage, upstream HTTP client, auth, registries.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pluggy
from aiohttp import web

from batlehub import admin, appkeys, replicas, sweep
from batlehub.accesslog import LoggingAccessLog
from batlehub.auth import Authenticator
from batlehub.config import REGISTRY_CORE_KEYS, Settings
from batlehub.coordination import FailOpenCache
from batlehub.db import create_database
from batlehub.errors import ConfigError, StartupError
from batlehub.interfaces import CacheBackendType, RegistryFormatType, StorageBackendType
from batlehub.middleware import MIDDLEWARES
from batlehub.plugins import flatten, gather_hook, get_plugin_manager
from batlehub.registries import RegistryServices
from batlehub.requests import registry_path
from batlehub.state import HubState

log = logging.getLogger("batlehub.server")

MAX_REQUEST_BODY = 1024**4  # publishes are streamed and limited by [limits]; aiohttp must not cap them


@dataclass(frozen=True)
class InstalledTypes:
    """What the installed plugins provide, by name."""

    cache: dict[str, CacheBackendType]
    storage: dict[str, StorageBackendType]
    registries: dict[str, RegistryFormatType]


def installed_types(pm: pluggy.PluginManager) -> InstalledTypes:
    def by_name(items: list[Any], kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for item in items:
            if item.name in out:
                raise StartupError(f"two plugins provide the {kind} type {item.name!r}")
            out[item.name] = item
        return out

    return InstalledTypes(
        cache=by_name(flatten(pm.hook.register_cache_backends()), "cache"),
        storage=by_name(flatten(pm.hook.register_storage_backends()), "storage"),
        registries=by_name(flatten(pm.hook.register_registry_formats()), "registry"),
    )


def _not_installed(section: str, name: str, choices: Mapping[str, Any]) -> str:
    return (
        f'[{section}] type "{name}" is not installed (installed: {", ".join(sorted(choices)) or "none"})'
        " — is its plugin installed?"
    )


def check_plugins_config(
    settings: Settings | None, types: InstalledTypes, raw: Mapping[str, Any] | None = None
) -> list[str]:
    """Problems that need the installed plugins to see: unknown types and their own keys.

    With `settings` (valid core settings), the chosen backend factories are asked too. Without
    them (the core settings have problems of their own), `raw` — the merged, unvalidated settings —
    is checked as far as it can be, so that `check-config` lists every problem in one go.
    """
    problems: list[str] = []
    if settings is not None:
        tables: list[tuple[str, Any]] = [("cache", settings.cache), ("storage", settings.storage)]
        registries = [(r.type, r.options) for r in settings.registries]
    else:
        raw = raw or {}
        tables = [(name, raw.get(name, {})) for name in ("cache", "storage")]
        entries = raw.get("registries", [])
        registries = [
            (entry.get("type"), {k: v for k, v in entry.items() if k not in REGISTRY_CORE_KEYS})
            for entry in (entries if isinstance(entries, list) else [])
            if isinstance(entry, Mapping)
        ]
    defaults = {"cache": "memory", "storage": "filesystem"}
    for section, table in tables:
        if not isinstance(table, Mapping):
            continue  # reported by the core's own validation
        choices: Mapping[str, Any] = types.cache if section == "cache" else types.storage
        type_name = table.get("type", defaults[section])
        chosen = choices.get(type_name)
        if chosen is None:
            problems.append(_not_installed(section, str(type_name), choices))
            continue
        unknown = [key for key in table if key != "type" and key not in chosen.config_keys]
        for key in unknown:
            known = ", ".join(sorted({"type", *chosen.config_keys}))
            problems.append(f"{section}.{key}: unknown key for type {chosen.name!r} (known: {known})")
        if not unknown and settings is not None:
            try:  # factories only construct (no I/O) and raise ConfigError for bad values
                chosen.factory(table, settings)
            except ConfigError as exc:
                problems.extend(exc.problems)
    for index, (registry_type, options) in enumerate(registries):
        if not isinstance(registry_type, str):
            continue  # reported by the core's own validation
        fmt = types.registries.get(registry_type)
        if fmt is None:
            problems.append(_not_installed(f"registries[{index}]", registry_type, types.registries))
            continue
        problems.extend(f"registries[{index}].{p}" for p in fmt.validate(options))
    return problems


def create_app(settings: Settings, pm: pluggy.PluginManager | None = None) -> web.Application:
    """Build the application. Raises `ConfigError` for settings the installed plugins reject."""
    pm = pm or get_plugin_manager()
    types = installed_types(pm)
    problems = check_plugins_config(settings, types)
    if problems:
        raise ConfigError(problems)

    state = HubState(tracing=bool(settings.otel.endpoint))
    app = web.Application(middlewares=[_in_flight_counter(state), *MIDDLEWARES], client_max_size=MAX_REQUEST_BODY)
    app[appkeys.SETTINGS] = settings
    app[appkeys.PLUGIN_MANAGER] = pm
    app[appkeys.STATE] = state
    app[appkeys.ACCESS_LOG] = LoggingAccessLog()

    cache_type = types.cache[settings.cache["type"]]
    storage_type = types.storage[settings.storage["type"]]
    db = create_database(settings)
    cache = cache_type.factory(settings.cache, settings)
    storage = storage_type.factory(settings.storage, settings)
    auth = Authenticator(settings, db)
    http = _UpstreamClient()
    app[appkeys.DATABASE] = db
    app[appkeys.CACHE] = cache
    app[appkeys.FAIL_OPEN_CACHE] = FailOpenCache(cache)
    app[appkeys.STORAGE] = storage
    app[appkeys.AUTH] = auth

    registries, services = {}, {}
    for registry_settings in settings.registries:
        format_type = types.registries[registry_settings.type]
        services[registry_settings.name] = RegistryServices(
            settings=settings,
            registry=registry_settings,
            format_type=format_type,
            db=db,
            cache=cache,
            cache_type=cache_type,
            storage=storage,
            storage_type=storage_type,
            tokens=auth,
            http=http.session,
            pm=pm,
        )
        registry = format_type.factory(registry_settings, services[registry_settings.name])
        subapp = registry.make_app()
        subapp[appkeys.REGISTRY_SETTINGS] = registry_settings
        app.add_subapp(registry_path(registry_settings.name), subapp)
        registries[registry_settings.name] = registry
    app[appkeys.REGISTRIES] = registries
    app[appkeys.REGISTRY_SERVICES] = services

    app.cleanup_ctx.append(_database_ctx)
    app.cleanup_ctx.append(_backend_ctx(appkeys.CACHE, "cache"))
    app.cleanup_ctx.append(_backend_ctx(appkeys.STORAGE, "storage"))
    app.cleanup_ctx.append(http.ctx)
    app.cleanup_ctx.append(_auth_ctx)
    app.cleanup_ctx.append(_registries_ctx)
    app.cleanup_ctx.append(_hooks_ctx)
    app.cleanup_ctx.append(replicas.heartbeat_ctx(cache_type, storage_type))
    app.cleanup_ctx.append(sweep.sweep_ctx)
    _check_replica_safety(app, cache_type, storage_type)

    admin.add_routes(app)
    if settings.server.static_dir:
        admin.add_static_ui(app, settings.server.static_dir)
    return app


def _in_flight_counter(state: HubState) -> Any:
    """Counts requests in their handlers, so a graceful stop can wait for them (see cli)."""

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        state.in_flight += 1
        try:
            response: web.StreamResponse = await handler(request)
            return response
        finally:
            state.in_flight -= 1

    return count


class _UpstreamClient:
    """One pooled, keep-alive client session for every upstream request of this process."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, limit_per_host=32, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=300, connect=5, sock_read=60),
                headers={"User-Agent": "batlehub"},
                auto_decompress=True,
            )
        return self._session

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        yield
        if self._session is not None:
            await self._session.close()


async def _database_ctx(app: web.Application) -> AsyncIterator[None]:
    db = app[appkeys.DATABASE]
    await db.connect()
    try:
        applied = await db.migrate(progress=lambda message: log.info("applying %s", message))
        if applied:
            log.info("database migrated to version %d", applied[-1])
    except BaseException:
        await db.close()
        raise
    yield
    await db.close()


def _backend_ctx(key: web.AppKey[Any], section: str) -> Any:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        backend = app[key]
        try:
            await backend.open()
        except (ConfigError, StartupError):
            raise
        except Exception as exc:
            raise StartupError(f"[{section}] could not be opened: {exc}") from exc
        yield
        await backend.close()

    return ctx


async def _auth_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[appkeys.SETTINGS]
    path = await app[appkeys.AUTH].ensure_first_start_token(settings.data_dir)
    if path is not None:
        log.warning("created an admin token (no [[auth]] tokens are configured); it is in %s", path)
    yield


async def _registries_ctx(app: web.Application) -> AsyncIterator[None]:
    registries = app[appkeys.REGISTRIES]
    for registry in registries.values():
        await registry.startup()
    yield
    for name, registry in registries.items():
        try:
            await registry.shutdown()
            # Writes made after answering (durable copies, artifact rows) land before the database closes.
            await app[appkeys.REGISTRY_SERVICES][name].close()
        except Exception:
            log.exception("registry %s did not shut down cleanly", name)


async def _hooks_ctx(app: web.Application) -> AsyncIterator[None]:
    pm = app[appkeys.PLUGIN_MANAGER]
    await gather_hook(pm.hook.startup(app=app, settings=app[appkeys.SETTINGS]))
    yield
    try:
        await gather_hook(pm.hook.shutdown(app=app))
    except Exception:
        log.exception("a plugin's shutdown hook failed")


def _check_replica_safety(app: web.Application, cache: CacheBackendType, storage: StorageBackendType) -> None:
    """Warn at start when settings only make sense for one process but several are configured."""
    settings = app[appkeys.SETTINGS]
    state = app[appkeys.STATE]
    if settings.server.workers > 1 and not cache.shared:
        state.warn(
            f"server.workers = {settings.server.workers} with the per-process {cache.name!r} cache: rate limits,"
            " blocks and leases are not shared between workers; set [cache] type to a shared backend"
        )
    if settings.server.workers > 1 and settings.database.type == "sqlite":
        state.warn("server.workers > 1 on SQLite: writes are serialized across processes; prefer postgresql")
    for message in state.warnings:
        log.warning(message)
