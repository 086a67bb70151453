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

from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, Field

from batlehub.configmodel import ConfigModel
from batlehub.interfaces import CacheBackendType
from batlehub.plugins import hookimpl

if TYPE_CHECKING:
    from batlehub.config import Settings
    from batlehub_cache_redis.backend import RedisCache

__all__ = ["DEFAULT_PREFIX", "RedisCache", "RedisCacheConfig", "register_cache_backends"]

DEFAULT_PREFIX = "batlehub:"


def _redis_url(url: str) -> str:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {url!r}")
    return url


class RedisCacheConfig(ConfigModel):
    """`[cache]` of `type = "redis"`."""

    url: Annotated[str, AfterValidator(_redis_url)] = Field(examples=["redis://localhost:6379/0"])
    prefix: str = DEFAULT_PREFIX
    """Put before every key, so several hubs can share one Redis."""


def _factory(config: RedisCacheConfig, settings: Settings) -> RedisCache:
    """Build from the validated `[cache]` table (no connection is made until `open`)."""
    from batlehub_cache_redis.backend import RedisCache  # the Redis client library: only when used

    return RedisCache(config.url, prefix=config.prefix)


def __getattr__(name: str) -> object:
    if name == "RedisCache":
        from batlehub_cache_redis.backend import RedisCache

        return RedisCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def register_cache_backends() -> list[CacheBackendType]:
    return [
        CacheBackendType(
            name="redis",
            description="Redis shared by every replica (fast; degrades gracefully while Redis is down)",
            factory=_factory,
            shared=True,
            config_model=RedisCacheConfig,
        )
    ]
