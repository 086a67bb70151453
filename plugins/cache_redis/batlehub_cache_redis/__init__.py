"""The `redis` cache backend for BatleHub: shared short-lived state for every replica in Redis.

Hooks implemented: `register_cache_backends` (provides `[cache] type = "redis"`).

Config (`[cache]`): `url` (required, e.g. `redis://cache:6379/0`, `rediss://` for TLS) and
`prefix` (default `batlehub:`, so several hubs can share one Redis).

While Redis is down the hub stays up, with these consequences (each logged at most once per
30 seconds, naming what is degraded):
- `ping` raises, so `/api/v1/admin/health` reports the cache check as failing;
- `get` / `get_stale` return None (a miss); `set` / `invalidate` are skipped;
- `incr_window` fails open: it returns a count of 0, so rate limiting allows every request;
- `record_violation` returns 0 and `get_block` returns None: IP blocks are not enforced;
- `get_banner` returns None; `acquire_lease`, `release_lease`, `extend_lease` return True, so
  single-flight degrades to one upstream fetch per replica and never deadlocks;
- admin writes (`block_ip`, `unblock_ip`, `list_blocks`, `set_banner`) raise
  `ServiceUnavailable` (503), so an operator knows they did not take effect.
The client reconnects by itself once Redis answers again; no restart is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from batlehub.errors import ConfigError
from batlehub.interfaces import CacheBackendType
from batlehub.plugins import hookimpl
from batlehub_cache_redis.backend import DEFAULT_PREFIX, RedisCache

if TYPE_CHECKING:
    from batlehub.config import Settings

__all__ = ["RedisCache", "register_cache_backends"]

_SCHEMES = ("redis://", "rediss://", "unix://")


def _factory(section: Mapping[str, Any], settings: Settings) -> RedisCache:
    problems = []
    url = section.get("url")
    if not url:
        problems.append('cache.url: required for the redis cache (e.g. "redis://localhost:6379/0")')
    elif not isinstance(url, str) or not url.startswith(_SCHEMES):
        problems.append(f"cache.url: expected a redis://, rediss:// or unix:// URL, got {url!r}")
    prefix = section.get("prefix", DEFAULT_PREFIX)
    if not isinstance(prefix, str):
        problems.append(f"cache.prefix: expected a string, got {prefix!r}")
    if problems:
        raise ConfigError(problems)
    return RedisCache(str(url), prefix=prefix)


@hookimpl
def register_cache_backends() -> list[CacheBackendType]:
    return [
        CacheBackendType(
            name="redis",
            description="Redis shared by every replica (fast; degrades gracefully while Redis is down)",
            factory=_factory,
            shared=True,
            config_keys=frozenset({"url", "prefix"}),
        )
    ]
