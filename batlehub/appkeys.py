"""Typed keys for what lives on the aiohttp application and on each request."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    import pluggy

    from batlehub.accesslog import AccessLog
    from batlehub.auth import Authenticator, Identity
    from batlehub.blocks import BlockList
    from batlehub.config import RegistrySettings, Settings
    from batlehub.coordination import FailOpenCache
    from batlehub.db import Database
    from batlehub.interfaces import CacheBackend, Registry, StorageBackend
    from batlehub.loopwatch import LoopWatch
    from batlehub.metrics import HubMetrics
    from batlehub.policies import PolicyStats
    from batlehub.policy_rules import RuleBook
    from batlehub.registries import RegistryServices
    from batlehub.state import HubState

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
PLUGIN_MANAGER: web.AppKey[pluggy.PluginManager] = web.AppKey("plugin_manager")
DATABASE: web.AppKey[Database] = web.AppKey("database")
CACHE: web.AppKey[CacheBackend] = web.AppKey("cache")
FAIL_OPEN_CACHE: web.AppKey[FailOpenCache] = web.AppKey("fail_open_cache")
"""The cache backend for the request path: failures miss and log a throttled warning."""
STORAGE: web.AppKey[StorageBackend] = web.AppKey("storage")
AUTH: web.AppKey[Authenticator] = web.AppKey("auth")
REGISTRIES: web.AppKey[dict[str, Registry]] = web.AppKey("registries")
REGISTRY_SERVICES: web.AppKey[dict[str, RegistryServices]] = web.AppKey("registry_services")
STATE: web.AppKey[HubState] = web.AppKey("state")
"""Process-wide runtime state (shutting down, warnings for health)."""
ACCESS_LOG: web.AppKey[AccessLog] = web.AppKey("access_log")
LOOP_WATCH: web.AppKey[LoopWatch] = web.AppKey("loop_watch")
BLOCKS: web.AppKey[BlockList] = web.AppKey("blocks")
"""The IP blocks, in memory (`batlehub.blocks`): what every request is checked against."""
"""How long the event loop was kept from serving (for logs and metrics)."""
METRICS: web.AppKey[HubMetrics | None] = web.AppKey("metrics")
"""The process's Prometheus metrics; None with `[metrics] enabled = false` (nothing is counted)."""
POLICY_RULES: web.AppKey[RuleBook] = web.AppKey("policy_rules")
"""Block, allow and exemption rules of every registry (`batlehub.policy_rules`)."""
POLICY_STATS: web.AppKey[PolicyStats] = web.AppKey("policy_stats")
"""Counters of what policies withheld and refused, for metrics (`batlehub.policies`)."""

# Set on sub-applications of registries, so handlers find their own settings.
REGISTRY_SETTINGS: web.AppKey[RegistrySettings] = web.AppKey("registry_settings")

# Per-request values set by the middleware pipeline (request[...]).
CLIENT_IP: web.RequestKey[str] = web.RequestKey("client_ip")
IDENTITY: web.RequestKey[Identity] = web.RequestKey("identity")
ROUTE: web.RequestKey[str] = web.RequestKey("route")
"""The route's name for metrics and span names, set by a registry format (`label_route`)."""

__all__ = [name for name in dir() if name.isupper()]
