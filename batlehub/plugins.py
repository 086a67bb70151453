"""Building the plugin manager and calling hooks.

The manager registers the built-ins (they are plugins like any other), then every entry point in
the `batlehub` group, unless `BATLEHUB_DISABLE_PLUGIN_AUTOLOAD=1` is set.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

import pluggy

from batlehub import hookspecs

log = logging.getLogger(__name__)

hookimpl = pluggy.HookimplMarker("batlehub")

BUILTIN_PLUGINS: tuple[str, ...] = (
    "batlehub.builtin.cache_memory",
    "batlehub.builtin.cache_postgres",
    "batlehub.builtin.storage_filesystem",
    "batlehub.builtin.policy_release_age",
    "batlehub.builtin.policy_lists",
)

ENTRY_POINT_GROUP = "batlehub"


def get_plugin_manager(load_entrypoints: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the hookspecs, the built-ins and (unless disabled) the entry points."""
    pm = pluggy.PluginManager("batlehub")
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        pm.register(import_module(module_name), name=module_name)
    autoload_disabled = os.environ.get("BATLEHUB_DISABLE_PLUGIN_AUTOLOAD", "") not in ("", "0")
    if load_entrypoints and not autoload_disabled:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    pm.check_pending()
    return pm


async def gather_hook(results: Iterable[Any]) -> list[Any]:
    """Resolve a hook call's results, awaiting the ones that async implementations returned.
    When one raises, the others not awaited yet are closed (two formats' async hooks: one
    answering 404 must not leave the other's coroutine behind, never awaited)."""
    pending = list(results)
    resolved = []
    try:
        for result in pending:
            if inspect.isawaitable(result):
                result = await result
            resolved.append(result)
    except BaseException:
        for rest in pending[len(resolved) + 1 :]:
            if inspect.iscoroutine(rest):
                rest.close()
        raise
    return resolved


async def fire_event(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> None:
    """Call an event hook (`on_publish`, ...) and wait for it; a plugin's failure is logged and
    never reaches the caller (an event reports what happened, it cannot undo it)."""
    try:
        await gather_hook(getattr(pm.hook, hook)(**kwargs))
    except Exception:
        log.exception("a plugin's %s hook failed", hook)


def flatten(results: Iterable[Any]) -> list[Any]:
    """Flatten the lists that `register_*` hooks return, skipping None."""
    items: list[Any] = []
    for result in results:
        if result:
            items.extend(result)
    return items


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin, for `batlehub plugins` and the admin API."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]
    provides: tuple[str, ...]


def describe_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Every registered plugin with its distribution, version, hooks and what it provides."""
    dist_of: dict[int, tuple[str, str]] = {
        id(plugin): (dist.metadata["name"], dist.version) for plugin, dist in pm.list_plugin_distinfo()
    }
    provides: dict[str, list[str]] = {}
    for hook_name, kind in (
        ("register_registry_formats", "registry"),
        ("register_cache_backends", "cache"),
        ("register_storage_backends", "storage"),
        ("register_policies", "policy"),
    ):
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            for item in impl.function() or []:
                provides.setdefault(impl.plugin_name, []).append(f"{kind}:{item.name}")
    from batlehub import __version__ as builtin_version

    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist, version = dist_of.get(id(plugin), (None, None))
        if dist is None and name in BUILTIN_PLUGINS:
            dist, version = "batlehub", builtin_version
        hooks = tuple(sorted(impl.name for impl in pm.get_hookcallers(plugin) or []))
        infos.append(PluginInfo(name, dist, version, hooks, tuple(provides.get(name, []))))
    return infos
