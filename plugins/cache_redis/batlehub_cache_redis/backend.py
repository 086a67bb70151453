"""`RedisCache`: the `CacheBackend` on Redis, and how it behaves while Redis is away.

Every read-modify-write is one Lua script or one MULTI transaction, so it is atomic across
connections and replicas. Expiry is Redis's own (PEXPIRE / PXAT), measured on the server's
clock, so replicas with drifting clocks agree. Needs Redis 6.2 or later (`SET .. PXAT`).

Keys, under the configured prefix (default `batlehub:`):
  m:<key>   hash {v: value, s: stale retention ms}, expiring at ttl + stale retention;
            fresh while its remaining time exceeds the stale retention
  w:<key>   fixed-window counter (INCR; the window starts with the first hit)
  v:<ip>    sorted set of violation times (a sliding log)
  b:<ip>    JSON of an IP block, expiring at the block's end; `blocks` is the set of blocked IPs
  banner    JSON of the banner
  l:<key>   lease owner, expiring after the lease's TTL

While Redis is unreachable the hub keeps serving rather than failing every request (see the
README): reads miss, writes are skipped, rate limits and blocks fail open, leases are granted
(single-flight degrades to one fetch per replica, never a deadlock), and `ping` raises so health
reports it. Admin writes (block, unblock, list blocks, set banner) raise `ServiceUnavailable`,
because an operator must learn that they did not happen. After a failure, calls skip Redis for
`RETRY_AFTER_SECS` instead of each waiting for a timeout; then the client reconnects by itself.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from batlehub.errors import ServiceUnavailable, StartupError
from batlehub.interfaces import Banner, IpBlock, WindowCount
from batlehub_cache_redis import DEFAULT_PREFIX

log = logging.getLogger(__name__)

SOCKET_TIMEOUT_SECS = 1.5
"""A request never waits longer than this (plus one quick retry) on a Redis that stopped answering."""
MAX_CONNECTIONS = 50
"""Connections per process; more concurrent calls queue for a free one."""
POOL_WAIT_SECS = 5.0
RETRY_AFTER_SECS = 1.0
"""After a connection failure, calls take the degraded path at once for this long."""
WARN_EVERY_SECS = 30.0
"""Each kind of degradation is logged at most once per this many seconds."""

# What "Redis is unreachable" looks like; anything else (a wrong type, a script error) is a bug
# and propagates.
UNAVAILABLE: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)

T = TypeVar("T")

_GET_FRESH = """
local entry = redis.call('HMGET', KEYS[1], 'v', 's')
if not entry[1] then return false end
local left = redis.call('PTTL', KEYS[1])
if left == -1 or left > tonumber(entry[2]) then return entry[1] end
return false
"""

_INCR_WINDOW = """
local count = redis.call('INCR', KEYS[1])
local left = redis.call('PTTL', KEYS[1])
if left < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  left = tonumber(ARGV[1])
end
return {count, left}
"""

_RECORD_VIOLATION = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('PEXPIRE', KEYS[1], window)
return redis.call('ZCARD', KEYS[1])
"""

_ACQUIRE_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_EXTEND_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def _ms(secs: float) -> int:
    return max(1, int(secs * 1000))


class RedisCache:
    """A `CacheBackend` on one Redis (or a Redis-compatible server) at `url`."""

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.url = url
        self.prefix = prefix
        self._client: Any = None
        self._pool: Any = None
        self._scripts: dict[str, Any] = {}
        self._down_until = 0.0
        self._last_warning: dict[str, float] = {}

    # --- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        # A blocking pool: a burst of concurrent calls waits for a free connection instead of
        # failing with "too many connections" (which would look like an outage).
        self._pool = redis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT_SECS,
            socket_timeout=SOCKET_TIMEOUT_SECS,
            socket_connect_timeout=SOCKET_TIMEOUT_SECS,
            socket_keepalive=True,
            health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._client = redis.Redis(connection_pool=self._pool)
        for name, source in (
            ("get_fresh", _GET_FRESH),
            ("incr_window", _INCR_WINDOW),
            ("record_violation", _RECORD_VIOLATION),
            ("acquire_lease", _ACQUIRE_LEASE),
            ("release_lease", _RELEASE_LEASE),
            ("extend_lease", _EXTEND_LEASE),
        ):
            # EVALSHA, and EVAL again after a restarted Redis forgot the script.
            self._scripts[name] = self._client.register_script(source)
        try:
            await self._client.ping()
        except UNAVAILABLE as exc:
            await self.close()
            raise StartupError(f"cannot reach Redis for the cache (cache.url = {_redact(self.url)}): {exc}") from exc

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.disconnect()

    async def ping(self) -> None:
        """Always asks Redis, even during the back-off, so health sees a recovery at once."""
        if self._client is None:
            raise ServiceUnavailable("cache is not open")
        await self._client.ping()
        self._down_until = 0.0

    # --- degradation ------------------------------------------------------------------------------

    async def _degradable(self, topic: str, fallback: T, call: Callable[[], Awaitable[T]]) -> T:
        """Run `call`; if Redis is unreachable, log (throttled) and return `fallback`."""
        if self._client is None:
            raise ServiceUnavailable("cache is not open")
        if time.monotonic() < self._down_until:
            self._warn(topic, None)
            return fallback
        try:
            return await call()
        except UNAVAILABLE as exc:
            self._down_until = time.monotonic() + RETRY_AFTER_SECS
            self._warn(topic, exc)
            return fallback

    async def _required(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run `call`; if Redis is unreachable, raise `ServiceUnavailable` (admin operations)."""
        if self._client is None or time.monotonic() < self._down_until:
            raise ServiceUnavailable("cache unavailable (Redis)")
        try:
            return await call()
        except UNAVAILABLE as exc:
            self._down_until = time.monotonic() + RETRY_AFTER_SECS
            raise ServiceUnavailable("cache unavailable (Redis)") from exc

    def _warn(self, topic: str, exc: BaseException | None) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(topic, -WARN_EVERY_SECS) < WARN_EVERY_SECS:
            return
        self._last_warning[topic] = now
        reason = f": {exc}" if exc is not None else ""
        log.warning("redis cache unreachable (%s)%s — %s", _redact(self.url), reason, _CONSEQUENCE[topic])

    def _key(self, kind: str, key: str) -> str:
        return f"{self.prefix}{kind}:{key}"

    # --- metadata ---------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        script = self._scripts["get_fresh"]
        value: bytes | None = await self._degradable("read", None, lambda: script(keys=[self._key("m", key)]))
        return value

    async def get_stale(self, key: str) -> bytes | None:
        value: bytes | None = await self._degradable("read", None, lambda: self._client.hget(self._key("m", key), "v"))
        return value

    async def set(
        self, key: str, value: bytes, ttl_secs: float | None = None, stale_retention_secs: float = 86400.0
    ) -> None:
        name = self._key("m", key)
        stale_ms = max(0, int(stale_retention_secs * 1000))

        async def write() -> None:
            async with self._client.pipeline(transaction=True) as tx:
                tx.delete(name)
                tx.hset(name, mapping={"v": bytes(value), "s": stale_ms})
                if ttl_secs is not None:
                    tx.pexpire(name, max(1, int(ttl_secs * 1000) + stale_ms))
                await tx.execute()

        await self._degradable("write", None, write)

    async def invalidate(self, key: str) -> None:
        await self._degradable("write", 0, lambda: self._client.delete(self._key("m", key)))

    # --- rate-limit counters ------------------------------------------------------------------------

    async def incr_window(self, key: str, window_secs: float) -> WindowCount:
        script = self._scripts["incr_window"]
        result = await self._degradable(
            "rate limiting", None, lambda: script(keys=[self._key("w", key)], args=[_ms(window_secs)])
        )
        if result is None:
            return WindowCount(count=0, reset_in_secs=float(window_secs))
        count, left_ms = result
        return WindowCount(count=int(count), reset_in_secs=max(int(left_ms), 0) / 1000)

    # --- IP violations and blocks -------------------------------------------------------------------

    async def record_violation(self, ip: str, window_secs: float) -> int:
        script = self._scripts["record_violation"]
        count = await self._degradable(
            "violations",
            0,
            lambda: script(keys=[self._key("v", ip)], args=[_ms(window_secs), uuid.uuid4().hex]),
        )
        return int(count)

    async def block_ip(self, block: IpBlock) -> None:
        async def write() -> None:
            async with self._client.pipeline(transaction=True) as tx:
                if block.expires_at <= time.time():
                    tx.delete(self._key("b", block.ip))
                    tx.srem(self._blocks_index, block.ip)
                else:
                    tx.set(self._key("b", block.ip), _block_json(block), pxat=int(block.expires_at * 1000))
                    tx.sadd(self._blocks_index, block.ip)
                await tx.execute()

        await self._required(write)

    async def get_block(self, ip: str) -> IpBlock | None:
        raw = await self._degradable("blocks", None, lambda: self._client.get(self._key("b", ip)))
        return _live_block(raw)

    async def list_blocks(self) -> list[IpBlock]:
        async def read() -> list[IpBlock]:
            ips = sorted(ip.decode() for ip in await self._client.smembers(self._blocks_index))
            if not ips:
                return []
            raws = await self._client.mget([self._key("b", ip) for ip in ips])
            blocks = [b for b in map(_live_block, raws) if b is not None]
            gone = [ip for ip, raw in zip(ips, raws, strict=True) if raw is None]
            if gone:  # blocks that expired by themselves leave their IP in the index
                await self._client.srem(self._blocks_index, *gone)
            return blocks

        return await self._required(read)

    async def unblock_ip(self, ip: str) -> bool:
        async def write() -> bool:
            async with self._client.pipeline(transaction=True) as tx:
                tx.delete(self._key("b", ip))
                tx.delete(self._key("v", ip))
                tx.srem(self._blocks_index, ip)
                deleted, _, _ = await tx.execute()
            return bool(deleted)

        return await self._required(write)

    @property
    def _blocks_index(self) -> str:
        return f"{self.prefix}blocks"

    # --- banner -------------------------------------------------------------------------------------

    async def get_banner(self) -> Banner | None:
        raw = await self._degradable("banner", None, lambda: self._client.get(f"{self.prefix}banner"))
        if raw is None:
            return None
        data = json.loads(raw)
        return Banner(message=data["message"], level=data["level"])

    async def set_banner(self, banner: Banner | None) -> None:
        name = f"{self.prefix}banner"
        if banner is None:
            await self._required(lambda: self._client.delete(name))
        else:
            payload = json.dumps({"message": banner.message, "level": banner.level})
            await self._required(lambda: self._client.set(name, payload))

    # --- leases -------------------------------------------------------------------------------------

    async def acquire_lease(self, key: str, owner: str, ttl_secs: float) -> bool:
        script = self._scripts["acquire_lease"]
        taken = await self._degradable(
            "leases", 1, lambda: script(keys=[self._key("l", key)], args=[owner, _ms(ttl_secs)])
        )
        return bool(taken)

    async def release_lease(self, key: str, owner: str) -> bool:
        script = self._scripts["release_lease"]
        released = await self._degradable("leases", 1, lambda: script(keys=[self._key("l", key)], args=[owner]))
        return bool(released)

    async def extend_lease(self, key: str, owner: str, ttl_secs: float) -> bool:
        script = self._scripts["extend_lease"]
        extended = await self._degradable(
            "leases", 1, lambda: script(keys=[self._key("l", key)], args=[owner, _ms(ttl_secs)])
        )
        return bool(extended)


_CONSEQUENCE = {
    "read": "cached metadata reads are misses (fetched from the database or upstream)",
    "write": "cache writes and invalidations are skipped",
    "rate limiting": "rate limiting is OFF (requests are allowed) until Redis is back",
    "violations": "IP violations are not counted (no automatic bans)",
    "blocks": "IP blocks are NOT enforced until Redis is back",
    "banner": "the banner is not shown",
    "leases": "leases are granted without coordination (each replica fetches for itself)",
}


def _block_json(block: IpBlock) -> str:
    return json.dumps(
        {"ip": block.ip, "reason": block.reason, "expires_at": block.expires_at, "created_at": block.created_at}
    )


def _live_block(raw: bytes | None) -> IpBlock | None:
    if raw is None:
        return None
    block = IpBlock(**json.loads(raw))
    # Redis expires the key itself; this guards the millisecond between its clock and ours.
    return block if block.expires_at > time.time() else None


def _redact(url: str) -> str:
    """The URL without its password, for logs and errors."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if ':' in credentials else user}@{host}"
