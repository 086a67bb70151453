"""How long the event loop was kept from serving.

A timer asks to be woken every `INTERVAL_SECS`; how late it wakes is how long something held the
loop (or the GIL, or the CPU) meanwhile. Every request waits that long too, so a long block is
logged, throttled, with what usually causes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from batlehub.coordination import LogThrottle, in_background

log = logging.getLogger(__name__)

INTERVAL_SECS = 0.05
WARN_SECS = 1.0


class LoopWatch:
    """Samples event-loop lag; `worst_secs` is the longest since start, `observe` sees each sample."""

    def __init__(self, *, warn_secs: float = WARN_SECS, observe: Callable[[float], None] | None = None) -> None:
        self.warn_secs = warn_secs
        self.worst_secs = 0.0
        self.observe = observe
        self._throttle = LogThrottle()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(INTERVAL_SECS)
            self.sample(loop.time() - started - INTERVAL_SECS)

    def sample(self, lag_secs: float) -> None:
        lag_secs = max(lag_secs, 0.0)
        self.worst_secs = max(self.worst_secs, lag_secs)
        if self.observe is not None:
            self.observe(lag_secs)
        if lag_secs >= self.warn_secs and (refused := self._throttle.admit()) is not None:
            more = f" ({refused} more since the last warning)" if refused else ""
            log.warning(
                "the event loop was blocked for %.1f s%s: every request waited; if this repeats, the"
                " machine is short of CPU for this load (run more replicas or raise server.workers)",
                lag_secs,
                more,
            )


def ctx(watch: LoopWatch) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run(app: web.Application) -> AsyncIterator[None]:
        async with in_background(watch.run, "batlehub-loop-watch"):
            yield

    return run
