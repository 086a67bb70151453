"""Handing freed memory back to the system (glibc only; elsewhere nothing here does anything).

A hub's big allocations are short-lived: a 16 MB document arrives from the worker process, is
rendered, spilled or cached, and dropped. glibc's malloc serves threads from arenas of their own
(up to eight per core) and gives back little of what is freed inside them, so a process that has
served a few big documents kept 230 MiB resident for good, although its caches held a third of
that (`bench/README.md`, the `rss` scenario). Two measures bring it to what the caches hold:

- `tune()`, at start: at most `ARENAS` arenas (the event loop's thread, plus one for the helper
  threads that receive worker results and run storage and SQLite calls), and a fixed trim
  threshold, which also keeps the mmap threshold fixed: by default glibc raises it to the size of
  the largest block freed, so after one 16 MB document every later big body comes from the heap
  and stays there. An operator's own `MALLOC_ARENA_MAX` / `MALLOC_TRIM_THRESHOLD_` win: glibc reads
  them before any of this runs.
- `Trimmer`: after big work (`note_big_work`), `malloc_trim(0)` in a thread, at most every
  `TRIM_EVERY_SECS`. It returns freed pages inside the heaps too, not only at their top. ctypes
  drops the GIL for the call, so requests go on meanwhile.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from batlehub.coordination import in_background

log = logging.getLogger(__name__)

ARENAS = 2
TRIM_THRESHOLD_BYTES = 1024 * 1024
M_TRIM_THRESHOLD = -1
M_ARENA_MAX = -8
"""`mallopt` parameter numbers (glibc's malloc.h)."""
TRIM_EVERY_SECS = 2.0
"""At most one trim per this interval, however much big work happens."""
BIG_BYTES = 1024 * 1024
"""Work on inputs this large counts as big: the memory it took is worth handing back."""

_big_work = 0


def _libc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only: musl has no arenas to cap or trim
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def tune(arenas: int = ARENAS, trim_threshold: int = TRIM_THRESHOLD_BYTES) -> list[str]:
    """Set malloc's arenas and trim threshold, before the process starts its threads; the
    settings made (none where this libc has no such settings, or the operator chose them)."""
    if _LIBC is None:
        return []
    made = []
    if "MALLOC_ARENA_MAX" not in os.environ and _LIBC.mallopt(M_ARENA_MAX, arenas):
        made.append("arenas")
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ and _LIBC.mallopt(M_TRIM_THRESHOLD, trim_threshold):
        made.append("trim_threshold")
    return made


def trim() -> bool:
    """Return freed memory to the system now (blocking: call it from a thread)."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False


def note_big_work(size: int) -> None:
    """Big work happened (an input of `size` bytes): the next trim tick hands its memory back."""
    global _big_work
    if size >= BIG_BYTES:
        _big_work += 1


class Trimmer:
    """Trims after big work, from a thread, at most every `every_secs`."""

    def __init__(self, *, every_secs: float = TRIM_EVERY_SECS, trim: Callable[[], bool] = trim) -> None:
        self.every_secs = every_secs
        self._trim = trim
        self._seen = _big_work - 1  # the first tick hands back what starting up left behind
        self.trims = 0

    async def tick(self) -> bool:
        """Trim if big work happened since the last tick; whether it trimmed."""
        if _big_work == self._seen:
            return False
        self._seen = _big_work
        await asyncio.get_running_loop().run_in_executor(None, self._trim)
        self.trims += 1
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_secs)
            try:
                await self.tick()
            except Exception as exc:  # never worth stopping the ticks for
                log.debug("malloc_trim failed: %s", exc)


def ctx(trimmer: Trimmer) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run(app: web.Application) -> AsyncIterator[None]:
        async with in_background(trimmer.run, "batlehub-memory-trim"):
            yield

    return run
