"""The IP blocks every request is checked against, kept in memory.

Asking the cache backend on every request costs a round trip (with Redis, about as much as the
rest of a cached packument request). Instead each process reloads the whole list every
`REFRESH_SECS`, so a block made on any replica (by an administrator or an automatic ban) holds
everywhere within that, and a change made here holds here at once. When the cache backend does
not answer, the last list read stays in force (and the failure is logged, throttled).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from batlehub.coordination import LogThrottle, in_background
from batlehub.interfaces import CacheBackend, IpBlock

log = logging.getLogger(__name__)

REFRESH_SECS = 0.5
FIRST_LOAD_SECS = 5.0
"""How long start-up waits for the first list (a cache backend that does not answer starts empty)."""


class BlockList:
    def __init__(self, cache: CacheBackend, *, refresh_secs: float = REFRESH_SECS) -> None:
        self.cache = cache
        self.refresh_secs = refresh_secs
        self._blocks: dict[str, IpBlock] = {}
        self._warn = LogThrottle()

    def get(self, ip: str) -> IpBlock | None:
        """The live block of `ip` (canonical form), if any."""
        block = self._blocks.get(ip)
        return block if block is not None and block.expires_at > time.time() else None

    def put(self, block: IpBlock) -> None:
        """A block this process just stored: in force here at once."""
        self._blocks = {**self._blocks, block.ip: block}

    def drop(self, ip: str) -> None:
        """A block this process just lifted."""
        self._blocks = {k: v for k, v in self._blocks.items() if k != ip}

    async def refresh(self) -> None:
        try:
            blocks = await self.cache.list_blocks()
        except Exception as exc:
            if self._warn():
                log.warning("cannot read the IP blocks from the cache backend (keeping the last list): %s", exc)
            return
        self._blocks = {b.ip: b for b in blocks}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_secs)
            await self.refresh()


def ctx(blocks: BlockList) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run(app: web.Application) -> AsyncIterator[None]:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(blocks.refresh(), FIRST_LOAD_SECS)
        async with in_background(blocks.run, "batlehub-ip-blocks"):
            yield

    return run
