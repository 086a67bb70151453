"""The application factory: settings in, a ready `web.Application` out.

Backends are chosen by name from what the plugins registered, constructed here (no I/O), and
opened and closed in their own `cleanup_ctx`, in dependency order: database (with migrations),
cache, storage, upstream HTTP client, auth, registries.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pluggy
from aiohttp import web
from pydantic import BaseModel, ValidationError

from batlehub import (
    accounts,
    admin,
    appkeys,
    loopwatch,
    memory,
    metrics,
    policy_admin,
    replicas,
    retention,
    sweep,
    tracing,
)
from batlehub import web as web_ui
from batlehub.accesslog import LoggingAccessLog
from batlehub.auth import Authenticator
from batlehub.blocks import BlockList
from batlehub.blocks import ctx as blocks_ctx
from batlehub.config import DEFAULT_RBAC, REGISTRY_CORE_KEYS, RegistrySettings, Settings
from batlehub.configmodel import forbids_unknown_keys, problems_of
from batlehub.coordination import FailOpenCache
from batlehub.db import Database, create_database
from batlehub.errors import ConfigError, StartupError
from batlehub.interfaces import CacheBackendType, PolicyType, RegistryFormatType, StorageBackend, StorageBackendType
from batlehub.middleware import MIDDLEWARES
from batlehub.observed import ObservedDatabase, ObservedStorage
from batlehub.offload import Offloader
from batlehub.plugins import flatten, gather_hook, get_plugin_manager
from batlehub.policies import PolicyStats
from batlehub.policy_rules import PolicyRule, RuleBook, config_rules
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
    policies: list[PolicyType] = dataclasses.field(default_factory=list)


def installed_types(pm: pluggy.PluginManager) -> InstalledTypes:
    def by_name(items: list[Any], kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for item in items:
            if item.name in out:
                raise StartupError(f"two plugins provide the {kind} type {item.name!r}")
            model = item.config_model
            # A model that ignored unknown keys would let a typo'd key silently fall back to a default.
            if not (isinstance(model, type) and issubclass(model, BaseModel) and forbids_unknown_keys(model)):
                raise StartupError(
                    f"the {kind} type {item.name!r} needs a config_model that refuses unknown keys"
                    " (derive it from batlehub.api.ConfigModel)"
                )
            out[item.name] = item
        return out

    policies: list[PolicyType] = flatten(pm.hook.register_policies())
    names = [p.name for p in policies]
    for name in names:
        if names.count(name) > 1:
            raise StartupError(f"two plugins provide the policy type {name!r}")
    return InstalledTypes(
        cache=by_name(flatten(pm.hook.register_cache_backends()), "cache"),
        storage=by_name(flatten(pm.hook.register_storage_backends()), "storage"),
        registries=by_name(flatten(pm.hook.register_registry_formats()), "registry"),
        policies=policies,
    )


def _not_installed(section: str, name: str, choices: Mapping[str, Any]) -> str:
    return (
        f'[{section}] type "{name}" is not installed (installed: {", ".join(sorted(choices)) or "none"})'
        " — is its plugin installed?"
    )


Descriptor = CacheBackendType | StorageBackendType | RegistryFormatType


def validate_config(
    descriptor: Descriptor, table: Mapping[str, Any] | BaseModel, *, path: str, settings: Settings | None = None
) -> BaseModel:
    """Validate the keys a descriptor owns with its `config_model`; raise `ConfigError` with every
    problem, each named by its key path under `path` (`storage`, `registries[0]`).

    `table` is the section as written: the core's own keys in it (`type`; a registry's `name`,
    `rbac`...) are left out. `settings` reach validators that need them (see
    `batlehub.configmodel.core_settings`). Already validated options are returned as they are.
    """
    model, problems = _validated(descriptor, table, path=path, settings=settings)
    if model is None:
        raise ConfigError(problems)
    return model


def _validated(
    descriptor: Descriptor, table: Mapping[str, Any] | BaseModel, *, path: str, settings: Settings | None
) -> tuple[BaseModel | None, list[str]]:
    # The one place core validates a plugin's keys, for create_app and check-config alike.
    model = descriptor.config_model
    if isinstance(table, model):
        return table, []
    if isinstance(table, BaseModel):
        raise TypeError(f"{path}: a {type(table).__name__} is not a {model.__name__}")
    core_keys = REGISTRY_CORE_KEYS if isinstance(descriptor, RegistryFormatType) else frozenset({"type"})
    data = {key: value for key, value in table.items() if key not in core_keys}
    try:
        return model.model_validate(data, context={"settings": settings}), []
    except ValidationError as exc:
        owner = f"type {descriptor.name!r}"
        return None, problems_of(exc, model, path=path, owner=owner, table_keys=core_keys)


@dataclass(frozen=True)
class PluginConfig:
    """The plugins' keys of valid settings, validated by the descriptors' config models."""

    cache: BaseModel
    storage: BaseModel
    registries: tuple[RegistrySettings, ...]
    """`settings.registries`, each with `options` replaced by its format's validated model."""


def validate_plugins_config(settings: Settings, types: InstalledTypes) -> PluginConfig:
    """Validate what the installed plugins own in `settings`; raise `ConfigError` with every problem."""
    config, problems = _check_plugins(settings, types, None)
    if config is None:
        raise ConfigError(problems)
    return config


def check_plugins_config(
    settings: Settings | None, types: InstalledTypes, raw: Mapping[str, Any] | None = None
) -> list[str]:
    """Problems that need the installed plugins to see: unknown types and their own keys.

    Without `settings` (the core settings have problems of their own), `raw` — the merged,
    unvalidated settings — is checked as far as it can be, so that `check-config` lists every
    problem in one go.
    """
    return _check_plugins(settings, types, raw)[1]


def _check_plugins(
    settings: Settings | None, types: InstalledTypes, raw: Mapping[str, Any] | None
) -> tuple[PluginConfig | None, list[str]]:
    problems: list[str] = []
    entries: list[tuple[Any, Mapping[str, Any] | BaseModel]]
    if settings is not None:
        tables: dict[str, Any] = {"cache": settings.cache, "storage": settings.storage}
        entries = [(r.type, r.options) for r in settings.registries]
    else:
        raw = raw or {}
        tables = {name: raw.get(name, {}) for name in ("cache", "storage")}
        listed = raw.get("registries", [])
        entries = [
            (entry.get("type"), entry)
            for entry in (listed if isinstance(listed, list) else [])
            if isinstance(entry, Mapping)
        ]
    defaults = {"cache": "memory", "storage": "filesystem"}
    backends: dict[str, BaseModel | None] = {}
    for section, table in tables.items():
        type_name = table.get("type", defaults[section]) if isinstance(table, Mapping) else None
        if not isinstance(type_name, str):
            continue  # reported by the core's own validation
        choices: Mapping[str, CacheBackendType | StorageBackendType] = (
            types.cache if section == "cache" else types.storage
        )
        chosen = choices.get(type_name)
        if chosen is None:
            problems.append(_not_installed(section, type_name, choices))
            continue
        backends[section], found = _validated(chosen, table, path=section, settings=settings)
        problems.extend(found)
    registries: list[RegistrySettings] = []
    for index, (registry_type, options) in enumerate(entries):
        if not isinstance(registry_type, str):
            continue  # reported by the core's own validation
        fmt = types.registries.get(registry_type)
        if fmt is None:
            problems.append(_not_installed(f"registries[{index}]", registry_type, types.registries))
            continue
        model, found = _validated(fmt, options, path=f"registries[{index}]", settings=settings)
        problems.extend(found)
        if settings is not None:
            problems.extend(config_rules(settings.registries[index], fmt, f"registries[{index}]")[1])
        if settings is not None and model is not None:
            registries.append(dataclasses.replace(settings.registries[index], options=model))
    cache, storage = backends.get("cache"), backends.get("storage")
    if problems or settings is None or cache is None or storage is None:
        return None, problems
    return PluginConfig(cache=cache, storage=storage, registries=tuple(registries)), problems


def with_default_registries(settings: Settings, types: InstalledTypes) -> Settings:
    """Settings whose registries are the installed formats' defaults when the config names none
    (`Settings.default_registries`); each format's note goes to the log. Otherwise `settings`."""
    if not settings.default_registries:
        return settings
    registries = []
    for name in sorted(types.registries):
        offer = types.registries[name].default_registry
        default = offer(settings) if offer is not None else None
        if default is None:
            continue
        if default.note:
            log.info("registry %s: %s", default.name, default.note)
        registries.append(
            RegistrySettings(
                type=name,
                name=default.name,
                rbac=dict(DEFAULT_RBAC),
                rate_limit=None,
                quota=None,
                options=dict(default.options),
            )
        )
    # Left marked when no format offered one: migrate and check-config need none, serve refuses.
    return dataclasses.replace(settings, registries=tuple(registries), default_registries=not registries)


def create_app(settings: Settings, pm: pluggy.PluginManager | None = None) -> web.Application:
    """Build the application. Raises `ConfigError` for settings the installed plugins reject."""
    pm = pm or get_plugin_manager()
    types = installed_types(pm)
    settings = with_default_registries(settings, types)
    if settings.default_registries:
        raise StartupError(
            "the configuration has no [[registries]] and no installed format offers a default one:"
            " install a registry format plugin (e.g. batlehub-npm), or configure [[registries]]"
        )
    config = validate_plugins_config(settings, types)
    # One entry per registry from here on, holding the validated options, wherever it is read.
    settings = dataclasses.replace(settings, registries=config.registries)

    state = HubState(tracing=bool(settings.otel.endpoint))
    tracing.set_active(state.tracing)
    observed = metrics.enable() if settings.metrics.enabled else None
    app = web.Application(middlewares=[_in_flight_counter(state), *MIDDLEWARES], client_max_size=MAX_REQUEST_BODY)
    app[appkeys.SETTINGS] = settings
    app[appkeys.PLUGIN_MANAGER] = pm
    app[appkeys.STATE] = state
    app[appkeys.ACCESS_LOG] = LoggingAccessLog()
    app[appkeys.METRICS] = observed

    cache_type = types.cache[settings.cache["type"]]
    storage_type = types.storage[settings.storage["type"]]
    db: Database = create_database(settings)
    cache = cache_type.factory(config.cache, settings)
    storage: StorageBackend = storage_type.factory(config.storage, settings)
    # The registries' storage is timed and traced; app[STORAGE] stays the backend itself (health,
    # the sweep and embedders see the configured type).
    served_storage = storage
    if observed is not None or state.tracing:
        db = ObservedDatabase(db, observed)
        served_storage = ObservedStorage(storage, observed)
    auth = Authenticator(settings, db)
    http = _UpstreamClient()
    app[appkeys.DATABASE] = db
    app[appkeys.CACHE] = cache
    app[appkeys.FAIL_OPEN_CACHE] = FailOpenCache(cache)
    app[appkeys.STORAGE] = storage
    app[appkeys.AUTH] = auth

    formats = {r.name: types.registries[r.type] for r in settings.registries}
    rules_in_config: dict[str, list[PolicyRule]] = {}
    for index, registry_settings in enumerate(settings.registries):
        rules_in_config[registry_settings.name] = config_rules(
            registry_settings, formats[registry_settings.name], f"registries[{index}]"
        )[0]
    rules = RuleBook(db=db, cache=app[appkeys.FAIL_OPEN_CACHE], formats=formats, config_rules=rules_in_config)
    app[appkeys.POLICY_RULES] = rules
    app[appkeys.POLICY_STATS] = policy_stats = PolicyStats()

    offload = Offloader()
    share = 1 / max(1, len(settings.registries))
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
            storage=served_storage,
            storage_type=storage_type,
            tokens=auth,
            http=http.session,
            pm=pm,
            offload=offload,
            fail_open=app[appkeys.FAIL_OPEN_CACHE],
            share=share,
            rules=rules,
            policy_types=types.policies,
            policy_stats=policy_stats,
        )
        registry = format_type.factory(registry_settings, services[registry_settings.name])
        subapp = registry.make_app()
        subapp[appkeys.REGISTRY_SETTINGS] = registry_settings
        app.add_subapp(registry_path(registry_settings.name), subapp)
        registries[registry_settings.name] = registry
    app[appkeys.REGISTRIES] = registries
    app[appkeys.REGISTRY_SERVICES] = services

    app.cleanup_ctx.append(_offload_ctx(offload))
    observe = metrics.loop_observer(observed, lambda: state.in_flight) if observed is not None else None
    app[appkeys.LOOP_WATCH] = watch = loopwatch.LoopWatch(observe=observe)
    app.cleanup_ctx.append(loopwatch.ctx(watch))
    app.cleanup_ctx.append(memory.ctx(memory.Trimmer()))
    app.cleanup_ctx.append(_database_ctx)
    app.cleanup_ctx.append(_backend_ctx(appkeys.CACHE, "cache"))
    app[appkeys.BLOCKS] = ip_blocks = BlockList(cache)
    app.cleanup_ctx.append(blocks_ctx(ip_blocks))  # once the cache backend is open
    app.cleanup_ctx.append(_backend_ctx(appkeys.STORAGE, "storage"))
    app.cleanup_ctx.append(http.ctx)
    app.cleanup_ctx.append(_auth_ctx)
    app.cleanup_ctx.append(_registries_ctx)
    app.cleanup_ctx.append(_hooks_ctx)
    app.cleanup_ctx.append(replicas.heartbeat_ctx(cache_type, storage_type))
    app.cleanup_ctx.append(sweep.sweep_ctx)
    app.cleanup_ctx.append(retention.retention_ctx)
    if observed is not None:
        app.cleanup_ctx.append(metrics.health_ctx(admin.check_backends))
    _check_replica_safety(app, cache_type, storage_type)

    admin.add_routes(app)
    accounts.add_routes(app)
    if observed is not None and not settings.metrics.port:
        app.router.add_get(metrics.PATH, metrics.serve_metrics)
    policy_admin.add_routes(app)
    if settings.server.static_dir:
        admin.add_static_ui(app, settings.server.static_dir)
    else:
        web_ui.add_routes(app)
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


def _offload_ctx(offload: Offloader) -> Any:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        offload.close()

    return ctx


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
