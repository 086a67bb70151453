"""The `memory` cache backend: all short-lived state in this process's memory.

Hooks implemented: `register_cache_backends` (provides `[cache] type = "memory"`).

It is the embedded default and the fastest backend, but it is not shared: with several replicas
(or `server.workers > 1`) each process has its own rate-limit counters, blocks, banner and
leases. Use `postgres` or `redis` there.

Every method runs without awaiting anything in between its reads and writes, so on one event
loop each one is atomic without locks. Durations use `time.monotonic()` (immune to clock
changes); only IP blocks use epoch seconds, because `IpBlock.expires_at` is one.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batlehub.interfaces import Banner, CacheBackendType, IpBlock, NoConfig, WindowCount
from batlehub.plugins import hookimpl

if TYPE_CHECKING:
    from batlehub.config import Settings

DEFAULT_MAX_ENTRIES = 10_000
"""Metadata entries kept at most; the least recently used go first. Packuments can be large, so
a cap on their number is what keeps one process's memory bounded."""

# Counters, violation logs and leases are small, but one per client IP or key: sweep the expired
# ones whenever a table grows past this many entries since the last sweep.
_SWEEP_EVERY = 4096


@dataclass
class _Entry:
    value: bytes
    fresh_until: float
    """Monotonic deadline; `inf` for entries set without a TTL."""
    stale_until: float


class MemoryCache:
    """A `CacheBackend` held in plain dicts of one process."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._counters: dict[str, tuple[int, float]] = {}
        self._violations: dict[str, deque[float]] = {}
        self._blocks: dict[str, IpBlock] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._banner: Banner | None = None
        self._writes_since_sweep = 0
        self._longest_violation_window = 0.0

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        self._entries.clear()
        self._counters.clear()
        self._violations.clear()
        self._leases.clear()

    async def ping(self) -> None:
        pass

    # --- metadata ---------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        entry = self._live_entry(key)
        if entry is None or entry.fresh_until <= time.monotonic():
            return None
        return entry.value

    async def get_stale(self, key: str) -> bytes | None:
        entry = self._live_entry(key)
        return None if entry is None else entry.value

    def _live_entry(self, key: str) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.stale_until <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    async def set(
        self, key: str, value: bytes, ttl_secs: float | None = None, stale_retention_secs: float = 86400.0
    ) -> None:
        now = time.monotonic()
        if ttl_secs is None:
            entry = _Entry(bytes(value), float("inf"), float("inf"))
        else:
            entry = _Entry(bytes(value), now + ttl_secs, now + ttl_secs + max(stale_retention_secs, 0.0))
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def invalidate(self, key: str) -> None:
        self._entries.pop(key, None)

    # --- rate-limit counters ------------------------------------------------------------------------

    async def incr_window(self, key: str, window_secs: float) -> WindowCount:
        # A fixed window that starts with the first hit, as the shared backends do.
        now = time.monotonic()
        count, ends = self._counters.get(key, (0, 0.0))
        if ends <= now:
            count, ends = 0, now + window_secs
        count += 1
        self._counters[key] = (count, ends)
        self._maybe_sweep(now)
        return WindowCount(count=count, reset_in_secs=ends - now)

    # --- IP violations and blocks -------------------------------------------------------------------

    async def record_violation(self, ip: str, window_secs: float) -> int:
        now = time.monotonic()
        self._longest_violation_window = max(self._longest_violation_window, window_secs)
        log = self._violations.setdefault(ip, deque())
        while log and log[0] <= now - window_secs:
            log.popleft()
        log.append(now)
        self._maybe_sweep(now)
        return len(log)

    async def block_ip(self, block: IpBlock) -> None:
        self._blocks[block.ip] = block

    async def get_block(self, ip: str) -> IpBlock | None:
        block = self._blocks.get(ip)
        if block is None:
            return None
        if block.expires_at <= time.time():
            del self._blocks[ip]
            return None
        return block

    async def list_blocks(self) -> list[IpBlock]:
        now = time.time()
        for ip in [ip for ip, b in self._blocks.items() if b.expires_at <= now]:
            del self._blocks[ip]
        return list(self._blocks.values())

    async def unblock_ip(self, ip: str) -> bool:
        self._violations.pop(ip, None)
        block = self._blocks.pop(ip, None)
        return block is not None and block.expires_at > time.time()

    # --- banner -------------------------------------------------------------------------------------

    async def get_banner(self) -> Banner | None:
        return self._banner

    async def set_banner(self, banner: Banner | None) -> None:
        self._banner = banner

    # --- leases -------------------------------------------------------------------------------------

    async def acquire_lease(self, key: str, owner: str, ttl_secs: float) -> bool:
        now = time.monotonic()
        holder = self._leases.get(key)
        if holder is not None and holder[1] > now and holder[0] != owner:
            return False
        self._leases[key] = (owner, now + ttl_secs)
        self._maybe_sweep(now)
        return True

    async def release_lease(self, key: str, owner: str) -> bool:
        holder = self._leases.get(key)
        if holder is None or holder[0] != owner:
            return False
        del self._leases[key]
        return holder[1] > time.monotonic()

    async def extend_lease(self, key: str, owner: str, ttl_secs: float) -> bool:
        now = time.monotonic()
        holder = self._leases.get(key)
        if holder is None or holder[0] != owner or holder[1] <= now:
            return False
        self._leases[key] = (owner, now + ttl_secs)
        return True

    def _maybe_sweep(self, now: float) -> None:
        """Drop expired counters, violation logs and leases now and then, so that a stream of
        distinct client IPs cannot grow them without limit."""
        self._writes_since_sweep += 1
        if self._writes_since_sweep < _SWEEP_EVERY:
            return
        self._writes_since_sweep = 0
        self._counters = {k: v for k, v in self._counters.items() if v[1] > now}
        self._leases = {k: v for k, v in self._leases.items() if v[1] > now}
        horizon = now - self._longest_violation_window
        self._violations = {ip: log for ip, log in self._violations.items() if log and log[-1] > horizon}


def _factory(config: NoConfig, settings: Settings) -> MemoryCache:
    """Build from the validated (empty) `[cache]` table: the memory cache has no keys of its own."""
    return MemoryCache()


@hookimpl
def register_cache_backends() -> list[CacheBackendType]:
    return [
        CacheBackendType(
            name="memory",
            description="in-process memory; fast, but each process has its own state (single node only)",
            factory=_factory,
            shared=False,
            config_model=NoConfig,
        )
    ]
