"""Meta-tests that keep the plugin seams honest: every hookspec is documented, typed, and reaches
a plugin that implements it (sync or async) when the server does what the spec says."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import pluggy
import pytest
from aiohttp import web
from pydantic import BaseModel

from batlehub import appkeys, hookspecs
from batlehub.app import create_app, installed_types
from batlehub.builtin.cache_memory import MemoryCache
from batlehub.config import Settings, parse_settings
from batlehub.errors import StartupError
from batlehub.interfaces import CacheBackendType, NoConfig, PolicyType, Registry, RegistryFormatType, StorageBackendType
from batlehub.package_page import PackagePage, VersionInfo
from batlehub.plugins import describe_plugins, gather_hook, get_plugin_manager, hookimpl

SPECS = hookspecs._all_specs()


def test_there_are_hookspecs() -> None:
    assert {"register_registry_formats", "register_cache_backends", "register_storage_backends"} <= set(SPECS)
    assert {"startup", "shutdown", "on_publish", "on_unpublish"} <= set(SPECS)
    assert {"package_page"} <= set(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_hookspec_is_documented_and_typed(name: str) -> None:
    spec = SPECS[name]
    doc = inspect.getdoc(spec) or ""
    assert len(doc) >= 40, f"{name}: the docstring must say when it fires, what to return, who wins"
    assert "return" in doc.lower(), f"{name}: the docstring must say what the return value means"
    signature = inspect.signature(spec)
    assert signature.return_annotation is not inspect.Signature.empty, name
    for parameter in signature.parameters.values():
        assert parameter.annotation is not inspect.Parameter.empty, f"{name}({parameter.name})"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_no_firstresult_on_hooks_that_may_be_async(name: str) -> None:
    """An async implementation returns a coroutine, never None: firstresult would stop at it."""
    opts = SPECS[name].batlehub_spec
    if opts.get("firstresult"):
        assert "may be async" not in (inspect.getdoc(SPECS[name]) or "").lower(), name


# --- a plugin that implements every hook -------------------------------------------------------------


class RecordedRegistry:
    """A registry of the recording plugin's own format: no routes, one package page."""

    def __init__(self, settings: Any, services: Any) -> None:
        self.name = settings.name

    def make_app(self) -> web.Application:
        return web.Application()

    async def startup(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass


class RecordingPlugin:
    """Implements every hookspec; lifecycle and event hooks async, to prove core awaits them."""

    def __init__(self) -> None:
        self.calls: dict[str, list[dict[str, Any]]] = {}

    def _record(self, hook: str, **kwargs: Any) -> None:
        self.calls.setdefault(hook, []).append(kwargs)

    @hookimpl
    def register_registry_formats(self) -> list[RegistryFormatType]:
        self._record("register_registry_formats")
        return [
            RegistryFormatType(name="recorded", description="test", config_model=NoConfig, factory=RecordedRegistry)
        ]

    @hookimpl
    def register_cache_backends(self) -> list[CacheBackendType]:
        self._record("register_cache_backends")
        return [CacheBackendType(name="recorded-memory", description="test", factory=lambda s, st: MemoryCache())]

    @hookimpl
    def register_storage_backends(self) -> list[StorageBackendType]:
        self._record("register_storage_backends")
        return []

    @hookimpl
    def register_policies(self) -> list[PolicyType]:
        self._record("register_policies")
        return [PolicyType(name="recorded-policy", description="test", factory=lambda setup: None)]

    @hookimpl
    async def startup(self, app: web.Application, settings: Settings) -> None:
        self._record("startup", app=app, settings=settings)

    @hookimpl
    async def shutdown(self, app: web.Application) -> None:
        self._record("shutdown", app=app)

    @hookimpl
    async def on_publish(self, registry: str, package: str, version: str, user_id: str | None, size: int) -> None:
        self._record("on_publish", registry=registry, package=package, version=version, user_id=user_id, size=size)

    @hookimpl
    def on_unpublish(self, registry: str, package: str, version: str | None, user_id: str | None) -> None:
        self._record("on_unpublish", registry=registry, package=package, version=version, user_id=user_id)

    @hookimpl
    async def package_page(
        self, registry: Registry, name: str, version: str | None, request: web.Request
    ) -> PackagePage | None:
        self._record("package_page", registry=registry.name, name=name, version=version)
        if not isinstance(registry, RecordedRegistry):
            return None
        return PackagePage(name=name, proxied=False, version=version, versions=(VersionInfo(version or "0.0.0"),))


def test_the_recording_plugin_covers_every_hookspec() -> None:
    """A new hookspec fails here until a test plugin implements it (and the test below calls it)."""
    implemented = {name for name in dir(RecordingPlugin) if hasattr(getattr(RecordingPlugin, name), "batlehub_impl")}
    assert implemented == set(SPECS)


@pytest.fixture
def recording() -> Any:
    pm = get_plugin_manager(load_entrypoints=False)
    plugin = RecordingPlugin()
    pm.register(plugin, name="test-recording")
    yield pm, plugin
    pm.unregister(name="test-recording")


async def test_every_hook_reaches_a_plugin(
    recording: tuple[pluggy.PluginManager, RecordingPlugin], aiohttp_client: Any, tmp_path: Path
) -> None:
    pm, plugin = recording
    settings = parse_settings(
        {"registries": [{"type": "recorded", "name": "rec"}], "cache": {"type": "recorded-memory"}}, data_dir=tmp_path
    )
    app = create_app(settings, pm)
    for name in ("register_registry_formats", "register_cache_backends", "register_storage_backends"):
        assert len(plugin.calls[name]) == 1, name
    assert plugin.calls["register_policies"], "policies are collected when the app is built"
    assert "startup" not in plugin.calls

    client = await aiohttp_client(app)
    # The app's settings: the registry's options replaced by its format's validated model.
    assert plugin.calls["startup"] == [{"app": app, "settings": app[appkeys.SETTINGS]}]
    assert (await client.get("/api/v1/admin/health")).status == 200  # the plugin's cache type is in use
    assert "shutdown" not in plugin.calls

    # Event hooks are fired by registry formats (the npm plugin) through services.pm; core's
    # contract is that they are declared, take these arguments, and may be async.
    await gather_hook(pm.hook.on_publish(registry="npm", package="left-pad", version="1.0.0", user_id="u", size=42))
    await gather_hook(pm.hook.on_unpublish(registry="npm", package="left-pad", version=None, user_id="u"))
    assert plugin.calls["on_publish"] == [
        {"registry": "npm", "package": "left-pad", "version": "1.0.0", "user_id": "u", "size": 42}
    ]
    assert plugin.calls["on_unpublish"] == [{"registry": "npm", "package": "left-pad", "version": None, "user_id": "u"}]

    # The web UI asks the formats for a package's page; the recording format answers for its own.
    page = await client.get("/packages/rec/left-pad?version=1.2.3")
    assert page.status == 200 and "left-pad" in await page.text()
    assert plugin.calls["package_page"] == [{"registry": "rec", "name": "left-pad", "version": "1.2.3"}]

    await client.close()
    assert plugin.calls["shutdown"] == [{"app": app}]
    assert set(plugin.calls) == set(SPECS)


def test_hook_implementations_with_unknown_arguments_are_refused() -> None:
    class Wrong:
        @hookimpl
        def startup(self, app: Any, settings: Any, colour: str) -> None:
            pass

    pm = get_plugin_manager(load_entrypoints=False)
    with pytest.raises(pluggy.PluginValidationError):
        pm.register(Wrong(), name="test-wrong")


async def test_a_failing_startup_hook_aborts_the_start(aiohttp_client: Any, tmp_path: Path) -> None:
    class Failing:
        @hookimpl
        async def startup(self, app: Any, settings: Any) -> None:
            raise RuntimeError("license server unreachable")

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Failing(), name="test-failing")
    with pytest.raises(RuntimeError, match="license server unreachable"):
        await aiohttp_client(create_app(parse_settings({"registries": []}, data_dir=tmp_path), pm))


async def test_a_failing_shutdown_hook_is_logged_and_ignored(
    aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Failing:
        @hookimpl
        def shutdown(self, app: Any) -> None:
            raise RuntimeError("flush failed")

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Failing(), name="test-failing")
    client = await aiohttp_client(create_app(parse_settings({"registries": []}, data_dir=tmp_path), pm))
    with caplog.at_level(logging.ERROR):
        await client.close()
    assert any("shutdown hook failed" in r.getMessage() for r in caplog.records)


def test_two_plugins_providing_one_type_is_a_startup_error() -> None:
    class Duplicate:
        @hookimpl
        def register_storage_backends(self) -> list[StorageBackendType]:
            return [StorageBackendType(name="filesystem", description="again", factory=lambda s, st: None)]  # type: ignore[arg-type,return-value]

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Duplicate(), name="test-duplicate")
    with pytest.raises(StartupError, match="two plugins provide the storage type 'filesystem'"):
        installed_types(pm)


def test_a_config_model_that_ignores_unknown_keys_is_a_startup_error() -> None:
    """Every descriptor's model must refuse unknown keys, or a typo'd key would fall back to a default."""

    class Lenient(BaseModel):
        label: str = ""

    class LenientPlugin:
        @hookimpl
        def register_storage_backends(self) -> list[StorageBackendType]:
            return [
                StorageBackendType(
                    name="lenient",
                    description="test",
                    factory=lambda c, s: None,  # type: ignore[arg-type,return-value]
                    config_model=Lenient,
                )
            ]

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(LenientPlugin(), name="test-lenient")
    with pytest.raises(StartupError, match="the storage type 'lenient' needs a config_model that refuses unknown keys"):
        installed_types(pm)


def test_builtins_are_plugins_described_with_what_they_provide() -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    infos = {i.name: i for i in describe_plugins(pm)}
    memory = infos["batlehub.builtin.cache_memory"]
    assert memory.distribution == "batlehub" and memory.version
    assert memory.provides == ("cache:memory",)
    assert memory.hooks == ("register_cache_backends",)
    assert infos["batlehub.builtin.cache_postgres"].provides == ("cache:postgres",)
    assert infos["batlehub.builtin.storage_filesystem"].provides == ("storage:filesystem",)


def test_disable_autoload_skips_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    from batlehub.plugins import BUILTIN_PLUGINS

    monkeypatch.setenv("BATLEHUB_DISABLE_PLUGIN_AUTOLOAD", "1")
    names = {name for name, _ in get_plugin_manager().list_name_plugin()}
    assert names == set(BUILTIN_PLUGINS)


async def test_an_async_hook_that_raises_leaves_no_other_coroutine_unawaited() -> None:
    ran: list[str] = []

    async def refuses() -> None:
        raise web.HTTPNotFound()

    async def answers() -> str:
        ran.append("answers")
        return "page"

    later = answers()
    with pytest.raises(web.HTTPNotFound):
        await gather_hook([refuses(), later])
    assert ran == [] and inspect.getcoroutinestate(later) == inspect.CORO_CLOSED
    assert await gather_hook([None, answers()]) == [None, "page"]
