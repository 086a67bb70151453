"""Hook specifications: the only way plugins extend BatleHub.

Every hook may be implemented sync or async; core resolves results with
`batlehub.plugins.gather_hook`. Built-ins (`batlehub.builtin.*`) implement these exactly as a
third-party distribution would; core registers them by module name (`plugins.BUILTIN_PLUGINS`)
before it loads the distributions of the `batlehub` entry-point group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from aiohttp import web

    from batlehub.config import Settings
    from batlehub.interfaces import CacheBackendType, PolicyType, Registry, RegistryFormatType, StorageBackendType
    from batlehub.package_page import PackagePage

hookspec = pluggy.HookspecMarker("batlehub")


# --- registration: what a plugin provides --------------------------------------------------------


@hookspec
def register_registry_formats() -> list[RegistryFormatType]:
    """Called once when the server (or `check-config`, `plugins`) starts.

    Return descriptors of the registry formats this plugin provides, or None/[] for none. Each
    `[[registries]] type` is matched against `RegistryFormatType.name`; two plugins providing the
    same name is a start-up error.
    """
    raise NotImplementedError


@hookspec
def register_cache_backends() -> list[CacheBackendType]:
    """Called once at start. Return descriptors of cache backends (`[cache] type`), or None/[]."""
    raise NotImplementedError


@hookspec
def register_storage_backends() -> list[StorageBackendType]:
    """Called once at start. Return descriptors of storage backends (`[storage] type`), or None/[]."""
    raise NotImplementedError


@hookspec
def register_policies() -> list[PolicyType]:
    """Called once at start. Return descriptors of policies (`PolicyType`), or None/[] for none.

    Every registry gets one policy of each kind from its factory (which may decline with None);
    core asks all of them about each package and combines their verdicts: of the actions said
    about a version, the strongest wins (`interfaces.VERDICT_ACTIONS`: exempt, block, allow,
    hide), and among equals the policy called first, i.e. the plugin registered last. Two kinds
    with one name are a start-up error. The built-ins are `release-age` and `lists`.
    """
    raise NotImplementedError


# --- lifecycle ------------------------------------------------------------------------------------


@hookspec
def startup(app: web.Application, settings: Settings) -> None:
    """Called after every backend is open and the registries have started, before the server
    accepts requests. May be async. Exceptions abort the start. The return value is ignored."""


@hookspec
def shutdown(app: web.Application) -> None:
    """Called while the server shuts down, before backends close. May be async. Exceptions are
    logged and ignored. The return value is ignored."""


# --- events ---------------------------------------------------------------------------------------


@hookspec
def on_publish(registry: str, package: str, version: str, user_id: str | None, size: int) -> None:
    """Called by core once per published version, after its transaction committed (so every
    reader sees it), whatever the format. May be async. Exceptions are logged, never undo the
    publish. The return value is ignored."""


@hookspec
def on_unpublish(registry: str, package: str, version: str | None, user_id: str | None) -> None:
    """Called by core after a version (or, with `version=None`, a whole package) was removed and
    the removal committed. May be async. Exceptions are logged. The return value is ignored."""


# --- web UI ---------------------------------------------------------------------------------------


@hookspec
def package_page(registry: Registry, name: str, version: str | None, request: web.Request) -> PackagePage | None:
    """Called by the web UI for a package page (`GET /packages/{registry}/{name}`), once per
    page, after core checked that the caller may read `registry`. May be async.

    Return a `batlehub.api.PackagePage` describing package `name` (at `version`, else its latest)
    when `registry` is one of your format's (`isinstance(registry, YourRegistry)`), or None when
    it is not yours. For your registry without such a package or version, raise
    `batlehub.api.NotFound`. Use `request` for URLs (`registry_url(request, registry.name)`)
    and the caller. Core renders the page (README Markdown sanitized, only http(s) links); a
    format writes no HTML. Several non-None answers: the plugin registered last wins, so a
    plugin can replace a format's page.
    """


def _all_specs() -> dict[str, Any]:
    """Every hookspec in this module, by name (used by the meta-tests)."""
    return {name: obj for name, obj in globals().items() if hasattr(obj, "batlehub_spec")}
