"""Working together without stepping on each other: within a process and across replicas.

- `LogThrottle`: an outage logs a line a minute, not a line per request.
- `FailOpenCache`: the cache backend as callers on a request path want it. Reads miss, writes are
  dropped and leases are granted when the backend does not answer, each with a throttled warning:
  the database and the upstreams are the truth, the cache only saves work.
- `SingleFlight`: one task per key does the work; concurrent callers in the process share it.
- `under_lease`: the same across replicas, with a lease in the cache backend; a replica that finds
  the lease taken watches for the holder's result instead of doing the work too.
- `BackgroundWrites`: writes made after answering, with `settle()` to wait for them.
- `warm_up`: fetch a registry's configured entries at start, each once across all replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from opentelemetry import trace

from batlehub import metrics, tracing
from batlehub.interfaces import Banner, CacheBackend, IpBlock, WindowCount

log = logging.getLogger(__name__)

T = TypeVar("T")

WARNING_EVERY_SECS = 60.0
LEASE_TTL_SECS = 15.0
"""Short, so a replica that dies while working blocks the others for seconds, not minutes; the
holder keeps extending it while it works."""
LEASE_POLL_SECS = 0.05


class LogThrottle:
    """Says yes to a key at most once per interval, and counts the noes in between."""

    def __init__(self, every_secs: float = WARNING_EVERY_SECS) -> None:
        self.every_secs = every_secs
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, key: str = "") -> bool:
        return self.admit(key) is not None

    def admit(self, key: str = "") -> int | None:
        """None when `key` had its turn within the interval; else how many were refused since."""
        now = time.monotonic()
        last, refused = self._last.get(key, (-self.every_secs, 0))
        if now - last < self.every_secs:
            self._last[key] = (last, refused + 1)
            return None
        if len(self._last) > 10_000:
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self.every_secs}
        self._last[key] = (now, 0)
        return refused


BANNER_SECS = 0.5
"""How long a process shows the banner it read before asking the cache again: the banner rides on
every npm response, and one cache round trip per request for it would double Redis's load. A
change on another replica shows within this; on the replica that made it, at once."""


class FailOpenCache:
    """A `CacheBackend` whose failures never fail the caller (see the module docstring).

    `warning` names what the failure costs, for the log line (the setting to check is always
    `[cache]`). Failures are counted (`batlehub_cache_errors_total`); with tracing on, each call is
    a child span (checked first, so that with tracing off a call costs what it did)."""

    def __init__(self, backend: CacheBackend, throttle: LogThrottle | None = None) -> None:
        self.backend = backend
        self._throttle = throttle or LogThrottle()
        self._banner: tuple[float, Banner | None] | None = None

    def _failed(self, exc: BaseException, what: str, operation: str) -> None:
        metrics.count_cache_error(operation)
        if self._throttle(what):
            log.warning("cache backend failed (%s): %s; check the [cache] settings", exc, what)

    async def _traced(self, operation: str, call: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        with tracing.tracer.start_as_current_span(f"cache {operation}", kind=trace.SpanKind.CLIENT):
            return await call(*args, **kwargs)

    async def get(self, key: str, *, stale: bool = False) -> bytes | None:
        if tracing.active:
            return await self._traced("get", self._get, key, stale)
        return await self._get(key, stale)

    async def _get(self, key: str, stale: bool) -> bytes | None:
        try:
            return await (self.backend.get_stale(key) if stale else self.backend.get(key))
        except Exception as exc:
            self._failed(exc, "reads miss until it answers again", "get")
            return None

    async def set(
        self, key: str, value: bytes, ttl_secs: float | None = None, stale_retention_secs: float = 86400.0
    ) -> bool:
        if tracing.active:
            return await self._traced("set", self._set, key, value, ttl_secs, stale_retention_secs)
        return await self._set(key, value, ttl_secs, stale_retention_secs)

    async def _set(self, key: str, value: bytes, ttl_secs: float | None, stale_retention_secs: float) -> bool:
        try:
            await self.backend.set(key, value, ttl_secs=ttl_secs, stale_retention_secs=stale_retention_secs)
            return True
        except Exception as exc:
            self._failed(exc, "writes are dropped until it answers again", "set")
            return False

    async def invalidate(self, key: str) -> None:
        try:
            await self.backend.invalidate(key)
        except Exception as exc:
            self._failed(exc, "writes are dropped until it answers again", "invalidate")

    async def incr_window(self, key: str, window_secs: float) -> WindowCount | None:
        if tracing.active:
            return await self._traced("incr_window", self._incr_window, key, window_secs)
        return await self._incr_window(key, window_secs)

    async def _incr_window(self, key: str, window_secs: float) -> WindowCount | None:
        try:
            return await self.backend.incr_window(key, window_secs)
        except Exception as exc:
            self._failed(exc, "rate limits are not enforced until it answers again", "incr_window")
            return None

    async def get_block(self, ip: str) -> IpBlock | None:
        if tracing.active:
            return await self._traced("get_block", self._get_block, ip)
        return await self._get_block(ip)

    async def _get_block(self, ip: str) -> IpBlock | None:
        try:
            return await self.backend.get_block(ip)
        except Exception as exc:
            self._failed(exc, "IP blocks are not enforced until it answers again", "get_block")
            return None

    async def get_banner(self) -> Banner | None:
        """The banner, as read at most `BANNER_SECS` ago."""
        now = time.monotonic()
        if self._banner is not None and now - self._banner[0] < BANNER_SECS:
            return self._banner[1]
        try:
            banner = await self.backend.get_banner()
        except Exception as exc:
            self._failed(exc, "the banner is not shown until it answers again", "get_banner")
            return None
        self._banner = (now, banner)
        return banner

    def remember_banner(self, banner: Banner | None) -> None:
        """The banner this process just set (or cleared, None): shown from now on, here."""
        self._banner = (time.monotonic(), banner)

    async def acquire_lease(self, key: str, owner: str, ttl_secs: float) -> bool:
        try:
            return bool(await self.backend.acquire_lease(key, owner, ttl_secs))
        except Exception as exc:
            self._failed(exc, "replicas do not coordinate until it answers again", "acquire_lease")
            return True

    async def extend_lease(self, key: str, owner: str, ttl_secs: float) -> None:
        try:
            await self.backend.extend_lease(key, owner, ttl_secs)
        except Exception as exc:
            self._failed(exc, "replicas do not coordinate until it answers again", "extend_lease")

    async def release_lease(self, key: str, owner: str) -> None:
        try:
            await self.backend.release_lease(key, owner)
        except Exception as exc:
            self._failed(exc, "replicas do not coordinate until it answers again", "release_lease")


class SingleFlight:
    """Run work once per key in this process; concurrent callers share its result. A caller that
    goes away (a client disconnects) does not cancel the work for the others.

    `kind` names the work in `batlehub_singleflight_waits_total` ("document", "artifact"...);
    without one, waits are not counted."""

    def __init__(self, kind: str = "") -> None:
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self.kind = kind

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        task = self._inflight.get(key)
        if task is not None and self.kind:
            metrics.count_wait(self.kind, "process")
        if task is None:
            task = asyncio.ensure_future(work())
            self._inflight[key] = task

            def done(t: asyncio.Future[Any]) -> None:
                if self._inflight.get(key) is t:
                    del self._inflight[key]
                if not t.cancelled():
                    t.exception()  # retrieved here, so an unawaited failure is not logged twice

            task.add_done_callback(done)
        result: T = await asyncio.shield(task)
        return result

    async def cancel_all(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def under_lease(
    cache: FailOpenCache,
    lease_key: str,
    *,
    wait_secs: float,
    ready: Callable[[], Awaitable[T | None]],
    work: Callable[[], Awaitable[T]],
    checked: bool = False,
    kind: str = "",
) -> T:
    """Across replicas: do `work` while holding the lease, or, while someone else holds it, watch
    `ready()` for their result; after `wait_secs` of waiting, do the work anyway.

    `checked`: the caller has just found `ready()` empty, so a lease taken at the first try needs
    no second look (at worst another replica finished in between and the work is done twice).
    `kind`: counts a wait in `batlehub_singleflight_waits_total` (scope "replica")."""
    owner = uuid.uuid4().hex
    deadline = time.monotonic() + wait_secs
    held = await cache.acquire_lease(lease_key, owner, LEASE_TTL_SECS)
    contended = not held
    if contended and kind:
        metrics.count_wait(kind, "replica")
    while not held:
        await asyncio.sleep(LEASE_POLL_SECS)
        result = await ready()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            log.info("waited %.0f s for another replica to finish %s; doing it here", wait_secs, lease_key)
            break
        held = await cache.acquire_lease(lease_key, owner, LEASE_TTL_SECS)
    keeper = asyncio.create_task(_keep_lease(cache, lease_key, owner)) if held else None
    try:
        if contended or not checked:
            result = await ready()  # another replica may have finished just before the lease was ours
            if result is not None:
                return result
        return await work()
    finally:
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            await cache.release_lease(lease_key, owner)


async def _keep_lease(cache: FailOpenCache, lease_key: str, owner: str) -> None:
    while True:
        await asyncio.sleep(LEASE_TTL_SECS / 3)
        await cache.extend_lease(lease_key, owner, LEASE_TTL_SECS)


@contextlib.asynccontextmanager
async def in_background(work: Callable[[], Coroutine[Any, Any, Any]], name: str) -> AsyncIterator[None]:
    """Run `work()` as a task for the duration of the block (a `cleanup_ctx`'s life: `async with
    in_background(watch.run, "batlehub-loop-watch"): yield`), cancelled and awaited at its end."""
    task = asyncio.create_task(work(), name=name)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class BackgroundWrites:
    """Work started after answering (e.g. durable copies, bookkeeping rows); `settle()` waits for
    all of it, and is what shutdown and tests call."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[None]] = set()

    def spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def cancel(self) -> None:
        """Stop what is still running (for work that may be dropped, e.g. delayed deletions)."""
        for task in list(self._tasks):
            task.cancel()
        await self.settle()


WarmOne = Callable[[str], Awaitable["tuple[str, float] | str"]]
"""Warms one entry: returns what it warmed (for the log, `name@1.2.3`) and for how many seconds
that stays warm, or a reason (logged as a warning) when there was nothing to warm."""


async def warm_up(cache: FailOpenCache, kind: str, registry: str, specs: Sequence[str], warm_one: WarmOne) -> None:
    """Warm each of `specs` (a format's `warm_packages` entries) once across all replicas, with
    `warm_one`. Meant to run in the background after start: logs progress and problems, never
    raises for them. A replica that finds another one warming an entry leaves it to that one;
    `kind` (the format's name) prefixes the cache keys of markers and leases."""
    total = len(specs)
    for index, spec in enumerate(specs, 1):
        try:
            await _warm_once(
                cache,
                f"{kind}:warmed:{registry}:{spec}",
                f"{kind}:lease:warm:{registry}:{spec}",
                spec,
                warm_one,
                f"warm-up {index}/{total}",
            )
        except Exception as exc:
            log.warning("warm-up %d/%d: %s failed: %s", index, total, spec, exc)
    if total:
        log.info("registry %s: warm-up done (%d packages)", registry, total)


async def _warm_once(cache: FailOpenCache, marker: str, lease: str, spec: str, warm_one: WarmOne, step: str) -> None:
    if await cache.get(marker):
        log.info("%s: %s already warm", step, spec)
        return
    owner = uuid.uuid4().hex
    if not await cache.acquire_lease(lease, owner, LEASE_TTL_SECS):
        log.info("%s: %s is being warmed by another replica", step, spec)
        return
    try:
        warmed = await warm_one(spec)
        if isinstance(warmed, str):
            log.warning("%s: %s", step, warmed)
            return
        what, ttl = warmed
        await cache.set(marker, what.encode(), ttl_secs=ttl)
        log.info("%s: %s", step, what)
    finally:
        await cache.release_lease(lease, owner)
